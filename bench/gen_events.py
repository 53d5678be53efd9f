#!/usr/bin/env python3
"""Writes signed customer.updated deliveries for the webhook benchmark, one per line:
`<Stripe-Signature>\t<body>`. Bodies are ~1.5 KB, spread over N customers, each event with a
later `created` than the previous one of its customer (no same-second ties).

usage: gen_events.py OUT COUNT CUSTOMERS SECRET [FIRST_ID]
"""
import hashlib
import hmac
import json
import sys
import time

out, count, customers, secret = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
first = int(sys.argv[5]) if len(sys.argv) > 5 else 0
t = int(time.time())
key = secret.encode()
with open(out, "w") as f:
    for n in range(first, first + count):
        c = n % customers
        body = json.dumps({
            "id": f"evt_bench{n:09d}",
            "object": "event",
            "api_version": "2025-08-27.basil",
            "created": 1_700_000_000 + n,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": "customer.updated",
            "data": {
                "object": {
                    "id": f"cus_bench{c}",
                    "object": "customer",
                    "address": {"city": "Paris", "country": "FR", "line1": "1 rue de la Paix",
                                "line2": None, "postal_code": "75002", "state": None},
                    "balance": 0,
                    "created": 1_690_000_000,
                    "currency": "eur",
                    "default_source": None,
                    "delinquent": False,
                    "description": "benchmark customer",
                    "email": f"bench-user-{c}@example.com",
                    "invoice_prefix": f"B{c:07d}",
                    "invoice_settings": {"custom_fields": None, "default_payment_method": None,
                                         "footer": None, "rendering_options": None},
                    "livemode": False,
                    "metadata": {"userId": f"bench-user-{c}", "source": "billsync",
                                 "created_at": "2026-11-26T00:00:00Z"},
                    "name": f"Bench{n} User{c}",
                    "next_invoice_sequence": 1,
                    "phone": "+14155550100",
                    "preferred_locales": ["en", "fr"],
                    "shipping": None,
                    "tax_exempt": "none",
                    "test_clock": None,
                },
                "previous_attributes": {"name": f"Bench{n - 1} User{c}",
                                        "metadata": {"note": "x" * 180}},
            },
        }, separators=(",", ":"))
        signature = hmac.new(key, f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
        f.write(f"t={t},v1={signature}\t{body}\n")
