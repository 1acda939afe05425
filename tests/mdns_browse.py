#!/usr/bin/env python3
"""An independent mDNS client for the tests: python-zeroconf browsing _localnet._tcp.

Usage: mdns_browse.py INTERFACE_IP SECONDS [SERVICE_TYPE]
Prints one JSON line per change, with the time it was seen (unix seconds):
  {"t": ..., "event": "resolved", "name": ..., "addresses": [...], "port": N, "txt": {...}}
  {"t": ..., "event": "removed", "name": ...}
"""
import json, sys, time
from zeroconf import ServiceBrowser, ServiceListener, Zeroconf

SERVICE = sys.argv[3] if len(sys.argv) > 3 else "_localnet._tcp.local."

def say(**kw):
    kw["t"] = time.time()
    print(json.dumps(kw), flush=True)

class Listener(ServiceListener):
    def add_service(self, zc, type_, name):
        info = zc.get_service_info(type_, name, timeout=3000)
        if info is None:
            return
        txt = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        say(event="resolved", name=name, addresses=info.parsed_addresses(), port=info.port, txt=txt)

    update_service = add_service

    def remove_service(self, zc, type_, name):
        say(event="removed", name=name)

zc = Zeroconf(interfaces=[sys.argv[1]])
ServiceBrowser(zc, SERVICE, Listener())
time.sleep(float(sys.argv[2]))
zc.close()
