#!/usr/bin/env python3
"""A fake OAuth 2.0 provider and a fake upstream on loopback, for scripts/test-image.sh.

    test-image-fakes.py PORTS_FILE LOG_FILE

Environment: FAKE_CLIENT_ID, FAKE_CLIENT_SECRET, FAKE_TOKEN.

The provider answers POST /oauth2/token (client_credentials, client_secret_basic) with FAKE_TOKEN,
only for the right client id and secret. The upstream answers 200 only to a request whose
Authorization header is exactly "Bearer FAKE_TOKEN", and 401 otherwise; it never echoes what it
received, so a 200 through tokenward proves the token was injected. Each request is logged to
LOG_FILE as one line (never with a credential). PORTS_FILE receives, once both listen, JSON with
their ports and two more free loopback ports for tokenward's route and admin listeners.
"""

import base64
import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

CLIENT_ID = os.environ["FAKE_CLIENT_ID"]
CLIENT_SECRET = os.environ["FAKE_CLIENT_SECRET"]
TOKEN = os.environ["FAKE_TOKEN"]
PORTS_FILE, LOG_FILE = sys.argv[1], sys.argv[2]
LOG_LOCK = threading.Lock()


def log(line):
    with LOG_LOCK, open(LOG_FILE, "a") as f:
        f.write(line + "\n")


class Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, content_type="text/plain"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Provider(Quiet):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        form = parse_qs(self.rfile.read(length).decode())
        basic = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if self.path != "/oauth2/token":
            log(f"provider: 404 {self.path}")
            self.answer(404, "not found")
        elif self.headers.get("Authorization") != basic:
            log("provider: refused: wrong client credentials")
            self.answer(401, json.dumps({"error": "invalid_client"}), "application/json")
        elif form.get("grant_type") != ["client_credentials"]:
            log(f"provider: refused: grant_type {form.get('grant_type')}")
            self.answer(400, json.dumps({"error": "unsupported_grant_type"}), "application/json")
        else:
            log("provider: token issued")
            body = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3600}
            self.answer(200, json.dumps(body), "application/json")


class Upstream(Quiet):
    def do_GET(self):
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            log(f"upstream: authorized GET {self.path}")
            self.answer(200, "authorized\n")
        else:
            log(f"upstream: refused GET {self.path}: wrong or missing token")
            self.answer(401, "unauthorized\n")


def free_ports(n):
    """n distinct free loopback ports (all held open until each is picked)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    picked = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return picked


servers = {name: ThreadingHTTPServer(("127.0.0.1", 0), handler)
           for name, handler in (("provider", Provider), ("upstream", Upstream))}
for server in servers.values():
    threading.Thread(target=server.serve_forever, daemon=True).start()
ports = {name: s.server_address[1] for name, s in servers.items()}
ports["route"], ports["admin"] = free_ports(2)
with open(PORTS_FILE + ".tmp", "w") as f:
    json.dump(ports, f)
os.replace(PORTS_FILE + ".tmp", PORTS_FILE)
threading.Event().wait()
