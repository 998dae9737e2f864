"""Build data/contracts.parquet and data/contract_fields.csv: the README's fields example.

Usage: python data/make_contracts.py

Five short commercial contracts, written for this example (the companies, people and places
are invented), and the six fields to extract from every one. Not every contract states every
field (one has no governing law, one no notice period), so a SQuAD 2.0-style model with
--allow-null should answer those with null.
"""

from __future__ import annotations

import csv
import os

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))

FIELDS = [
    ("supplier", "Who is the supplier?"),
    ("customer", "Who is the customer?"),
    ("effective_date", "When does the agreement take effect?"),
    ("term", "How long does the agreement last?"),
    ("notice_period", "How much notice is needed to terminate the agreement?"),
    ("governing_law", "Which law governs the agreement?"),
]

CONTRACTS = [
    ("C-2024-001", "supply", (
        "SUPPLY AGREEMENT. This Supply Agreement is made on 3 March 2024 between Northwind Components Ltd, "
        "a company registered in England (the Supplier), and Harbor Robotics Inc., a Delaware corporation "
        "(the Customer). The Supplier shall manufacture and deliver the servo motors listed in Schedule 1. "
        "This Agreement takes effect on 1 April 2024 and continues for an initial term of three years, after "
        "which it renews automatically for successive periods of one year. Either party may terminate this "
        "Agreement by giving the other party at least ninety days' written notice before the end of the "
        "current term. The Customer shall pay each invoice within thirty days of receipt. This Agreement is "
        "governed by the laws of England and Wales."
    )),
    ("C-2024-002", "services", (
        "MASTER SERVICES AGREEMENT between Bluefin Analytics GmbH, Hamburg (the \"Provider\"), and the City of "
        "Lakemoor (the \"Client\"). The Provider will operate the Client's traffic data platform and deliver "
        "monthly reports. The agreement is effective from 15 January 2024 and "
        "remains in force for 24 months. The Client may end the agreement for convenience on sixty days' "
        "notice in writing. Fees are set out in the price list attached as Annex B. This agreement shall be "
        "governed by and construed in accordance with German law."
    )),
    ("C-2024-003", "lease", (
        "EQUIPMENT LEASE. Lessor: Crestline Leasing LLC. Lessee: Orchard Valley Farms Cooperative. The "
        "Lessor leases to the Lessee two Model T-400 harvesters. The lease commences on the delivery date, "
        "expected to be 1 June 2024, and runs for five harvest seasons. Monthly rent is USD 4,200, payable "
        "in advance. The Lessee may not terminate the lease early except as provided in Section 9. This "
        "lease is governed by the laws of the State of California."
    )),
    ("C-2024-004", "supply", (
        "Purchase and Supply Terms. Seller: Kestrel Paper Mills S.A. Buyer: Greenleaf Print Shops Ltd. "
        "The Seller agrees to supply recycled paper stock to the Buyer's print shops on the weekly schedule "
        "in Appendix 1. These terms apply from 1 September 2024 for a period of eighteen months. Either party "
        "may terminate on thirty days' notice if the other party materially breaches these terms and fails "
        "to remedy the breach. Prices are fixed for the first six months and reviewed quarterly after that."
    )),
    ("C-2024-005", "services", (
        "SOFTWARE SUPPORT AGREEMENT. This agreement is entered into by Quarry Lane Software Pty Ltd (the "
        "Vendor) and Marigold Health Clinics (the Customer). The Vendor will provide second-line support "
        "and security updates for the Clinic Scheduler application. Support starts on 1 July 2024 and "
        "lasts for one year unless extended in writing. Response times are described in the service level "
        "schedule. This agreement is governed by the laws of New South Wales, Australia."
    )),
]


def main(out_dir: str = HERE) -> None:
    table = pa.table({
        "id": [c[0] for c in CONTRACTS],
        "kind": [c[1] for c in CONTRACTS],
        "passage": [c[2] for c in CONTRACTS],
    })
    pq.write_table(table, os.path.join(out_dir, "contracts.parquet"), compression="zstd")
    with open(os.path.join(out_dir, "contract_fields.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["field", "question"])
        writer.writerows(FIELDS)
    print(f"wrote {len(CONTRACTS)} contracts and {len(FIELDS)} fields to {out_dir}")


if __name__ == "__main__":
    main()
