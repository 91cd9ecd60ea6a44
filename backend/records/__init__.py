"""Records, from the broker to the database: MQTT ingest, verification, storage, enrolment
and the devices that sign them."""
