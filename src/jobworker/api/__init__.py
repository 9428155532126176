"""The gRPC API over mutual TLS 1.3: the jobworkerd server and its client helpers.

Importing this package pins gRPC's TLS 1.2 cipher list to a suite that cannot be negotiated
without a pre-shared key, which leaves TLS 1.3 as the only version gRPC can complete; it must
happen before gRPC initialises, so import ``jobworker.api`` before ``grpc``. The server checks
the effect at start-up (see ``_tls.check_tls13_only``).
"""

from __future__ import annotations

import os

TLS12_BLOCKING_CIPHERS = "ECDHE-PSK-CHACHA20-POLY1305"
os.environ["GRPC_SSL_CIPHER_SUITES"] = TLS12_BLOCKING_CIPHERS
# grpcio's fork handlers crash forked children; nothing of ours forks a gRPC process.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
# gRPC core logs every refused handshake (each TLS 1.2 attempt, the start-up self-check) at
# INFO on stderr; the server's own log says what matters.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
