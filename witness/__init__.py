"""``odo-witness``: a witness of transparency logs (c2sp.org/tlog-witness).

It cosigns a log's checkpoint only if the checkpoint extends the last one it cosigned for that
log, as a consistency proof shows; so a log cannot show two histories to parties that require
its cosignature. It imports protocol and common only::

    witness.core    the decisions on a request (pure)
    witness.state   its SQLite state file: its key, and the last checkpoint cosigned per log
    witness.server  the HTTP service (POST /add-checkpoint)
    witness.cli     the odo-witness command
"""
