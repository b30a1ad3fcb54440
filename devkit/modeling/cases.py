"""Seeded Salesforce-style support cases for the text route (``case_summary`` on vLLM).

Each case reads like the ``Description`` of a Salesforce ``Case`` record written by an agent
or sent in by e-mail: the account, the product, what went wrong, what it costs the customer,
what was tried. The route asks an LLM for a two-line summary for the account team.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACCOUNTS = ("Hallstatt Logistik GmbH", "Norrmark Foods AB", "Calder & Pike Ltd", "Vireo Retail SA")
PRODUCTS = ("invoice portal", "EDI gateway", "payment run scheduler", "vendor onboarding app")
PROBLEMS = (
    "rejects every upload since the last release with error 502",
    "posts duplicate invoices when the network drops during submission",
    "shows payment dates one day early for vendors in another time zone",
    "times out for purchase orders with more than two hundred lines",
)
IMPACTS = (
    "Month-end close is blocked for the whole finance team.",
    "Two suppliers have threatened to stop deliveries.",
    "About forty invoices a day need manual correction.",
    "The customer's auditors flagged the discrepancy.",
)
TRIED = (
    "Clearing the cache and re-sending did not help.",
    "A workaround with manual CSV export works but takes hours.",
    "The issue does not occur in the sandbox org.",
    "Support reproduced it with the customer's test file.",
)
CASE_MODEL = "case_summary"
"""The text route's model name (served by vLLM under this name)."""
PROMPT = "Summarise this customer case in two lines for the account team.\n\nCase: "


@dataclass(frozen=True)
class SupportCase:
    case_number: str
    account: str
    description: str

    @property
    def prompt(self) -> str:
        return PROMPT + self.description


def generate_cases(count: int, seed: int) -> list[SupportCase]:
    """``count`` cases; the same seed always gives the same cases."""
    rng = np.random.default_rng(seed)
    cases = []
    for index in range(count):
        account, product, problem, impact, tried = (
            options[int(rng.integers(len(options)))]
            for options in (ACCOUNTS, PRODUCTS, PROBLEMS, IMPACTS, TRIED)
        )
        cases.append(
            SupportCase(
                case_number=f"{index + 1:08d}",
                account=account,
                description=f"{account} reports that the {product} {problem}. {impact} {tried}",
            )
        )
    return cases
