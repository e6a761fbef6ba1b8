"""Code the client and the server share that is neither wire protocol nor native code.

``etfs_server`` imports from ``etfs`` only this package, `etfs.protocol` and
`etfs._sendfile_cffi` (``tests/test_layout.py`` checks it); everything else under ``etfs``
is the client.
"""
