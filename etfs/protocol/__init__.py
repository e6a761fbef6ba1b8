"""The etfs wire protocol, shared by client and server: frames, messages, handshake, errors.

Pure code with no I/O (`connection`, `messages`, `auth`, `data`), plus the thin trio
adapter that owns a socket (`trio_stream`).
"""
