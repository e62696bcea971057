"""Serve Keystone's WSGI application on 127.0.0.1:PORT with a threaded wsgiref server
(enough for tests; no uwsgi/apache needed). Keystone reads OS_KEYSTONE_CONFIG_FILES."""

import socketserver
import sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class ThreadedServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):  # keystone logs to its own file
        pass


port = int(sys.argv[1])
sys.argv = sys.argv[:1]  # keystone parses the command line when it is imported
from keystone.wsgi.api import application  # noqa: E402

make_server("127.0.0.1", port, application, server_class=ThreadedServer,
            handler_class=QuietHandler).serve_forever()
