"""Run localstripe's aiohttp app on 127.0.0.1 only, with a private state file.

Usage: python localstripe_server.py PORT STATE_DIR

localstripe's own CLI binds every interface ('::') and keeps its state in the
hard-coded /tmp/localstripe.pickle, shared by every instance.  Here the state
goes to STATE_DIR/localstripe.pickle and the server starts from scratch.
localstripe re-pickles the whole store several times per write (a create
costs ~12 ms empty, ~165 ms with 2000 customers); with
BILLSYNC_LOCALSTRIPE_PERSIST=0 nothing is written and writes stay fast.
"""
import logging
import os
import pickle
import sys

from aiohttp import web
from localstripe import resources
from localstripe.server import app

port = int(sys.argv[1])
state = os.path.join(sys.argv[2], 'localstripe.pickle')


def dump_to_disk(self):
    if os.environ.get('BILLSYNC_LOCALSTRIPE_PERSIST', '1') == '0':
        return
    with open(state, 'wb') as f:
        pickle.dump(self, f, protocol=pickle.HIGHEST_PROTOCOL)


resources.Store.dump_to_disk = dump_to_disk
resources.Store.try_load_from_disk = lambda self: None

logger = logging.getLogger('aiohttp.access')
logger.setLevel(logging.DEBUG)
logger.addHandler(logging.StreamHandler())

web.run_app(app, host='127.0.0.1', port=port, access_log=logger,
            print=lambda *a: print(*a, flush=True))
