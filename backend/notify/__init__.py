"""Webhook notifications for the fleet manager and the partner.

:mod:`backend.notify.config` reads the ``[[webhook]]`` tables of the config file;
:mod:`backend.notify.events` finds what happened in the tables the backend already keeps, from a
cursor kept in the database, and stores each event once with one delivery per subscribed webhook;
:mod:`backend.notify.webhooks` signs and POSTs them, with retries; :mod:`backend.notify.runner`
runs both in threads of ``odo-backend run``.
"""
