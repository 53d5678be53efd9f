"""The test world of README's "Adopting an existing Stripe account" (issue 16 §5), in a
localstripe of its own: an app that has run the spec's getOrCreateStripeCustomer for a while.

    python3 bench/adoption_world.py STRIPE_BASE USERS SUBSCRIPTIONS OUT_DIR

- USERS users; all but 300 have a customer made as the spec's code makes one (email, name,
  metadata userId, source, created_at);
- 5 % changed their email since, half in Stripe (the portal), half in the app;
- 1 % got a second customer (the spec's check-then-create race), created after the first;
- SUBSCRIPTIONS subscriptions, one each on the first customers.

Writes OUT_DIR/users.jsonl (the app's export, as `billsync users import` reads it) and
OUT_DIR/expected.json (each user's customer, the duplicates, the subscriptions, how many
customers exist). Loopback only.
"""

import base64
import http.client
import json
import sys
import time
import urllib.parse

base, users, subscriptions, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
host = urllib.parse.urlparse(base)
conn = http.client.HTTPConnection(host.hostname, host.port)
auth = "Basic " + base64.b64encode(b"sk_test_adoption:").decode()


def call(method, path, form=None):
    body = urllib.parse.urlencode(form or {})
    headers = {"Authorization": auth, "Content-Type": "application/x-www-form-urlencoded"}
    conn.request(method, path, body=body if method != "GET" else None, headers=headers)
    response = conn.getresponse()
    data = json.loads(response.read())
    if response.status >= 300:
        raise SystemExit(f"{method} {path}: {response.status} {data}")
    return data


def customer(user_id, email, name):
    return call("POST", "/v1/customers", {
        "email": email, "name": name,
        "metadata[userId]": user_id, "metadata[source]": "checkout_flow",
        "metadata[created_at]": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })["id"]


NO_CUSTOMER = 300
changed = users * 5 // 100
duplicated = users // 100
ids = [f"user-{i:05d}" for i in range(users)]
with_customer = ids[: users - NO_CUSTOMER]
stripe_side = set(with_customer[:changed // 2])
app_side = set(with_customer[changed // 2: changed])
twice = with_customer[changed: changed + duplicated]

started = time.time()
customer_of = {}
for n, user_id in enumerate(with_customer):
    customer_of[user_id] = customer(user_id, f"{user_id}@example.com", f"First{n} Last{n}")
for user_id in stripe_side:
    call("POST", f"/v1/customers/{customer_of[user_id]}",
         {"email": f"{user_id}.new@example.com"})
# The racing second customers come later, so the first one is unambiguously the oldest.
time.sleep(1.1)
duplicates = {user_id: customer(user_id, f"{user_id}@example.com", "Second Customer")
              for user_id in twice}

call("POST", "/v1/plans", {"id": "pro-monthly", "amount": "1000", "currency": "usd",
                           "interval": "month", "product[name]": "Pro"})
subscription_ids = []
for user_id in with_customer[:subscriptions]:
    cus = customer_of[user_id]
    token = call("POST", "/v1/tokens", {"card[number]": "4242424242424242", "card[exp_month]": "12",
                                        "card[exp_year]": "2030", "card[cvc]": "123"})
    call("POST", f"/v1/customers/{cus}/sources", {"source": token["id"]})
    sub = call("POST", "/v1/subscriptions", {"customer": cus, "items[0][plan]": "pro-monthly"})
    subscription_ids.append(sub["id"])

with open(f"{out}/users.jsonl", "w") as export:
    for n, user_id in enumerate(ids):
        email = f"{user_id}.app@example.com" if user_id in app_side else f"{user_id}@example.com"
        export.write(json.dumps({"id": user_id, "email": email, "email_verified": True,
                                 "first_name": f"First{n}", "last_name": f"Last{n}"}) + "\n")
with open(f"{out}/expected.json", "w") as expected:
    json.dump({"customer_of": customer_of, "duplicates": duplicates,
               "subscriptions": subscription_ids,
               "customers": len(customer_of) + len(duplicates),
               "email_changed_in_stripe": len(stripe_side),
               "email_changed_in_app": len(app_side)}, expected)
print(f"world: {users} users, {len(customer_of)} customers + {len(duplicates)} duplicates, "
      f"{len(subscription_ids)} subscriptions, {len(stripe_side)}+{len(app_side)} emails changed, "
      f"in {time.time() - started:.0f} s")
