"""``odo-verify``: a buyer's check of a mileage certificate, offline.

It needs :mod:`protocol` and the standard library only, so it installs with the base
distribution (``pip install odoledger``), without the agent's or the backend's extras.
"""
