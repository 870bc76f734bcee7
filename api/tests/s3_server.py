"""moto's S3 server for the integration tests, serving one request at a time.

moto's own `python -m moto.server` is threaded, and its If-None-Match check and the
write that follows are not atomic, so two concurrent put-if-absent requests can both
win. Real S3 (and MinIO) make that check atomic; serving requests one by one gives the
tests the same guarantee.

usage: python3 s3_server.py HOST PORT
"""

import sys

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    run_simple(host, port, DomainDispatcherApplication(create_backend_app), threaded=False)
