#!/usr/bin/env python3
"""The baseline: the same job the way publishers usually script it.

Pages the marketplace lead table with Microsoft's official SDK (azure-data-tables),
turns each row into a Salesforce Lead and upserts it with one REST call per row
(PATCH /services/data/v62.0/sobjects/Lead/Leadsync_Key__c/{key}), over one
keep-alive HTTP session (requests). No merging per customer, no state.

Prints one JSON line: {"rows", "seconds", "calls", "failed", "vm_hwm_kib"}. Run by bench/run.sh
(leadsync-bench suite), against the same Azurite table and the same fake Salesforce.
"""

import argparse
import hashlib
import json
import sys
import time

import requests
from azure.data.tables import TableClient

API = "v62.0"
KEY_FIELD = "Leadsync_Key__c"


def lead_from(entity):
    """A Salesforce Lead from one table row (the columns usual scripts look at)."""
    try:
        info = json.loads(entity.get("CustomerInfo") or "{}")
    except ValueError:
        return None, None
    if not isinstance(info, dict):
        return None, None
    email = (info.get("Email") or "").strip()
    source = (entity.get("LeadSource") or "").split("|")[0].strip()
    source = source.rsplit("-", 1)[0].strip()
    lead = {
        "FirstName": info.get("FirstName"),
        "LastName": info.get("LastName") or "[not provided]",
        "Email": email or None,
        "Phone": info.get("Phone"),
        "Country": info.get("Country"),
        "Company": info.get("Company") or "[not provided]",
        "Title": info.get("Title"),
        "LeadSource": source[:40] or None,
        "Description": "{} via {} ({})".format(
            entity.get("OfferDisplayName") or entity.get("OfferTitle") or "",
            entity.get("LeadSource") or "",
            entity.get("CreatedTime") or "",
        ),
    }
    lead = {k: v for k, v in lead.items() if v}
    identity = email.lower() or "{}|{}".format(entity["PartitionKey"], entity["RowKey"])
    key = "ls-" + hashlib.sha256(identity.encode()).hexdigest()[:20]
    return key, lead


def vm_hwm_kib():
    """This process's peak RSS (getrusage's ru_maxrss would include the parent's, see
    bench/src/procinfo.rs)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connection-string", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--login-url", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret", required=True)
    args = parser.parse_args()

    started = time.perf_counter()
    session = requests.Session()
    token = session.post(
        args.login_url.rstrip("/") + "/services/oauth2/token",
        data={
            "grant_type": "client_credentials",
            "client_id": args.client_id,
            "client_secret": args.client_secret,
        },
        timeout=30,
    )
    token.raise_for_status()
    token = token.json()
    session.headers["Authorization"] = "Bearer " + token["access_token"]
    base = "{}/services/data/{}/sobjects/Lead/{}/".format(
        token["instance_url"].rstrip("/"), API, KEY_FIELD
    )

    table = TableClient.from_connection_string(args.connection_string, table_name=args.table)
    rows = calls = failed = 0
    for entity in table.list_entities(results_per_page=1000):
        rows += 1
        key, lead = lead_from(entity)
        if lead is None:
            failed += 1
            continue
        response = session.patch(base + key, json=lead, timeout=30)
        calls += 1
        if response.status_code not in (200, 201, 204):
            failed += 1
            print("upsert {} failed: HTTP {} {}".format(key, response.status_code, response.text[:200]),
                  file=sys.stderr)
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": rows, "seconds": seconds, "calls": calls, "failed": failed,
                      "vm_hwm_kib": vm_hwm_kib()}))


if __name__ == "__main__":
    main()
