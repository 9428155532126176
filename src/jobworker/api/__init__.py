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
# gRPC core prints its own lines on stderr ("E1201 ... ssl_transport_security.cc" for every
# refused handshake, "add_port.cc" for a port in use), which users of jobctl and operators
# reading the server's log should not have to decode: both say what matters in one line of
# their own (jobctl's explain(), the server's StartupError and log).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
