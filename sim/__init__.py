"""Simulation for the demo, the tests and the benchmarks (never shipped: not a package in pyproject).

Simulated cars on an ELM327 emulator (:mod:`sim.car`, :mod:`sim.profile`,
:mod:`sim.emulator_host`); the whole system as real processes (:mod:`sim.stack`, with
:mod:`sim.processes`, :mod:`sim.broker` and :mod:`sim.cars`); and simulated devices that sign
records and talk MQTT without an agent (:mod:`sim.devices`, :mod:`sim.mqtt_device`).
"""
