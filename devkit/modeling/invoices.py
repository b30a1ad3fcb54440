"""A seeded generator of SAP-style supplier invoices with a known payment-risk ground truth.

Each row is one posted supplier invoice (what an S/4HANA ``SupplierInvoice`` and its vendor
master record say about it); the label is whether the invoice turned out to be a problem: paid
late, disputed, or stopped as fraudulent. The marginals follow what accounts-payable data looks
like: amounts log-normal around a median of about 1,800 EUR with a long tail, most vendors of
several years' standing but a steady stream of new ones, payment terms clustered on the usual
net-14/30/45/60/90 days. The correlations are the ones auditors look for: new vendors change
bank details more often, manual entries are more frequent for large amounts, and late-payment
history grows with tenure. About 15 % of invoices are problems.

``shift`` produces the two kinds of drift the monitor must notice:

- ``"amount_cents"``: an upstream interface change delivers amounts in cents (x100); the labels
  are those of the real invoices. A model trained on that extract is version 2's regression.
- ``"young_vendors"``: a supplier onboarding wave; tenure drops to a quarter and the riskier
  behaviour of young vendors follows from the generator itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

FEATURES: tuple[str, ...] = (
    "amount_eur",
    "vendor_tenure_days",
    "payment_terms_days",
    "days_to_due",
    "past_late_payments",
    "new_bank_account",
    "foreign_vendor",
    "manual_entry",
)
"""Column order of ``Dataset.x``; the Triton model's input tensor uses the same order."""

Shift = Literal["amount_cents", "young_vendors"]

PAYMENT_TERMS_DAYS = np.array([0.0, 14.0, 30.0, 45.0, 60.0, 90.0])
PAYMENT_TERMS_SHARE = np.array([0.05, 0.15, 0.40, 0.15, 0.15, 0.10])

# The ground truth: the log-odds of a problem invoice. Log amount and log tenure make the
# truth non-linear in the raw features, so a linear model fits it well but not perfectly.
TRUTH_INTERCEPT = -2.6
TRUTH_LOG_AMOUNT = 0.7  # per e-fold of amount over 1,000 EUR
TRUTH_LOG_TENURE = -0.8  # per e-fold of tenure in years
TRUTH_TERMS = 0.015  # per day of payment terms beyond 30
TRUTH_OVERDUE = 0.05  # per day already overdue
TRUTH_LATE_HISTORY = 0.45  # per past late payment
TRUTH_NEW_BANK = 1.9
TRUTH_FOREIGN = 0.5
TRUTH_MANUAL = 0.8


@dataclass(frozen=True)
class Dataset:
    x: npt.NDArray[np.float64]
    """Shape (rows, len(FEATURES)), columns in ``FEATURES`` order."""
    y: npt.NDArray[np.int64]
    """1 for a problem invoice, 0 otherwise."""


def ground_truth_logit(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The log-odds the labels are drawn from, for invoices with amounts in EUR."""
    column = {name: x[:, index] for index, name in enumerate(FEATURES)}
    years = column["vendor_tenure_days"] / 365.0
    overdue = np.maximum(-column["days_to_due"], 0.0)
    return (
        TRUTH_INTERCEPT
        + TRUTH_LOG_AMOUNT * np.log(column["amount_eur"] / 1000.0)
        + TRUTH_LOG_TENURE * np.log1p(years)
        + TRUTH_TERMS * (column["payment_terms_days"] - 30.0)
        + TRUTH_OVERDUE * overdue
        + TRUTH_LATE_HISTORY * column["past_late_payments"]
        + TRUTH_NEW_BANK * column["new_bank_account"]
        + TRUTH_FOREIGN * column["foreign_vendor"]
        + TRUTH_MANUAL * column["manual_entry"]
    )


def generate(rows: int, seed: int, *, shift: Shift | None = None) -> Dataset:
    """``rows`` invoices and their labels; the same seed always gives the same data."""
    rng = np.random.default_rng(seed)
    amount = np.clip(rng.lognormal(mean=np.log(1800.0), sigma=1.1, size=rows), 5.0, 2.5e6)
    tenure = np.minimum(rng.gamma(shape=1.3, scale=900.0, size=rows), 15 * 365.0)
    if shift == "young_vendors":
        tenure = tenure / 4.0
    tenure = np.floor(tenure)
    terms = rng.choice(PAYMENT_TERMS_DAYS, size=rows, p=PAYMENT_TERMS_SHARE)
    # Days since posting: most invoices are still open, some are past their due date.
    age = np.floor(rng.uniform(0.0, 1.0, size=rows) * (terms + 25.0))
    days_to_due = terms - age
    late_history = rng.poisson(0.15 + 0.35 * np.log1p(tenure / 365.0), size=rows).astype(float)
    new_bank = rng.random(rows) < 0.02 + 0.18 * np.exp(-tenure / 120.0)
    foreign = rng.random(rows) < 0.25
    manual = rng.random(rows) < 0.08 + 0.12 * (amount > 10_000.0)
    x = np.column_stack(
        [
            amount,
            tenure,
            terms,
            days_to_due,
            late_history,
            new_bank.astype(float),
            foreign.astype(float),
            manual.astype(float),
        ]
    )
    probability = 1.0 / (1.0 + np.exp(-ground_truth_logit(x)))
    y = (rng.random(rows) < probability).astype(np.int64)
    if shift == "amount_cents":
        x = x.copy()
        x[:, FEATURES.index("amount_eur")] *= 100.0
    return Dataset(x=x, y=y)
