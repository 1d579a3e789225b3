"""Seeded generator for the bundled synthetic corpus of person records.

Every record describes one fictional person (a clinic note, a patient portal message, a
support ticket, a referral letter or a lab-result notice). Names, addresses, phone numbers
and e-mail addresses come from Faker; everything else comes from the templates and clinical
tables in `templates/clinical.json`, which were written for dptrain. The output is a JSONL file with one
``{"id", "patient_id", "kind", "text"}`` object per line; a patient has 1 to 30 records
(heavy-tailed), all naming the same person (:class:`_Patients`).

The output is a pure function of ``(n, seed)`` and the installed Faker version: dates are
drawn from fixed ranges (never relative to today) and all randomness comes from a
``random.Random(seed)`` plus ``Faker.seed_instance(seed)``. Regenerate the bundled file with::

    python -m dptrain.data.synth --out dptrain/data/bundled/clinic_notes.jsonl --n 4500 --seed 0
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

try:
    from faker import Faker
except ImportError:  # a development tool: runtime reads the bundled file, never this module
    raise ImportError(
        "regenerating the bundled corpus needs faker (a development dependency). Fix: "
        "pip install -e '.[dev]'"
    ) from None

T = TypeVar("T")

__all__ = ["DEFAULT_N", "DEFAULT_SEED", "KINDS", "generate", "main", "write_jsonl"]

DEFAULT_N = 4500
DEFAULT_SEED = 0

_START = dt.date(2021, 1, 4)
_END = dt.date(2024, 12, 20)


@dataclass(frozen=True)
class _Med:
    name: str
    doses: tuple[str, ...]
    freqs: tuple[str, ...]


@dataclass(frozen=True)
class _Condition:
    name: str
    reasons: tuple[str, ...]
    symptoms: tuple[str, ...]
    findings: tuple[str, ...]
    meds: tuple[_Med, ...]
    tests: tuple[str, ...]
    plans: tuple[str, ...]
    complaint: str = ""  # noun phrase for patient messages ("my {complaint}")
    specialty: str = "internal medicine"  # referral target
    lab: str = "blood work"  # a result a patient may ask about
    vitals: str = "normal"  # "htn", "fever", "tachy", "normal"
    ages: tuple[int, int] = (18, 90)
    followup: tuple[str, ...] = ("2 weeks", "4 weeks", "6 weeks", "3 months")


_TABLES = Path(__file__).resolve().parent / "templates" / "clinical.json"


def _load_tables(path: Path = _TABLES) -> dict:
    """The clinical tables (conditions with their symptoms, findings, medications, tests and
    plans; visit types, clinics, allergies, social history), as tuples."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    conditions = tuple(
        _Condition(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in c.items() if k != "meds"},
            meds=tuple(_Med(m["name"], tuple(m["doses"]), tuple(m["freqs"])) for m in c["meds"]),
        )
        for c in raw["conditions"]
    )
    return {"conditions": conditions, **{k: tuple(raw[k]) for k in _LISTS}}


_LISTS = ("visit_types", "clinics", "allergies", "social")
_T = _load_tables()
_CONDITIONS: tuple[_Condition, ...] = _T["conditions"]
_VISIT_TYPES: tuple[str, ...] = _T["visit_types"]
_CLINICS: tuple[str, ...] = _T["clinics"]
_ALLERGIES: tuple[str, ...] = _T["allergies"]
_SOCIAL: tuple[str, ...] = _T["social"]


def _sex_words(sex: str) -> tuple[str, str, str]:
    return ("she", "her", "female") if sex == "F" else ("he", "his", "male")


class _Gen:
    """Holds the seeded sources of randomness for one generation run."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.fake = Faker("en_US")
        self.fake.seed_instance(seed)

    # -- small helpers -------------------------------------------------------------------
    def pick(self, xs: Sequence[T]) -> T:
        return xs[self.rng.randrange(len(xs))]

    def sample(self, xs: Sequence[T], lo: int, hi: int) -> list[T]:
        k = self.rng.randint(lo, min(hi, len(xs)))
        return self.rng.sample(list(xs), k)

    def date(self) -> dt.date:
        return _START + dt.timedelta(days=self.rng.randrange((_END - _START).days))

    def fmt_date(self, d: dt.date) -> str:
        style = self.rng.randrange(3)
        if style == 0:
            return d.isoformat()
        if style == 1:
            return f"{d.month:02d}/{d.day:02d}/{d.year}"
        return f"{d.strftime('%B')} {d.day}, {d.year}"

    def person(self, ages: tuple[int, int] = (18, 90)) -> dict:
        self.last_person = self._person(ages)
        return self.last_person

    def _person(self, ages: tuple[int, int]) -> dict:
        sex = self.pick(("F", "M"))
        first = self.fake.first_name_female() if sex == "F" else self.fake.first_name_male()
        last = self.fake.last_name()
        age = self.rng.randint(*ages)
        visit = self.date()
        dob = visit - dt.timedelta(days=365 * age + self.rng.randrange(365) + age // 4)
        return {
            "first": first,
            "last": last,
            "name": f"{first} {last}",
            "sex": sex,
            "age": age,
            "dob": dob,
            "visit": visit,
            "phone": self.fake.phone_number(),
            "street": self.fake.street_address(),
            "city": self.fake.city(),
            "state": self.fake.state_abbr(include_territories=False),
            "zip": self.fake.postcode(),
            "email": f"{first}.{last}{self.rng.randrange(100)}@{self.fake.free_email_domain()}".lower(),
            "mrn": f"{self.rng.randrange(10**7, 10**8)}",
        }

    def doctor(self) -> str:
        return f"Dr. {self.fake.first_name()[0]}. {self.fake.last_name()}"

    def vitals(self, kind: str, age: int) -> str:
        r = self.rng
        sbp, dbp = r.randint(108, 132), r.randint(66, 84)
        hr, temp, rr, spo2 = (
            r.randint(60, 88),
            r.choice((36.5, 36.6, 36.7, 36.8, 37.0)),
            r.randint(12, 18),
            r.randint(96, 100),
        )
        if kind == "htn":
            sbp, dbp = r.randint(136, 172), r.randint(86, 104)
        elif kind == "fever":
            temp, hr = round(r.uniform(37.8, 39.2), 1), r.randint(84, 108)
        elif kind == "tachy":
            hr, rr, spo2 = r.randint(96, 118), r.randint(18, 24), r.randint(93, 97)
        weight = r.randint(18, 45) if age < 13 else r.randint(50, 118)
        parts = [
            f"BP {sbp}/{dbp}",
            f"HR {hr}",
            f"Temp {temp} C",
            f"RR {rr}",
            f"SpO2 {spo2}%",
            f"weight {weight} kg",
        ]
        keep = sorted(r.sample(range(1, 6), r.randint(2, 4)))  # BP always, 2-4 others
        return ", ".join([parts[0]] + [parts[i] for i in keep])

    def med_line(self, med: _Med) -> str:
        return f"{med.name} {self.pick(med.doses)} {self.pick(med.freqs)}"

    # -- record kinds --------------------------------------------------------------------
    def clinic_note(self) -> str:
        c = self.pick(_CONDITIONS)
        p = self.person(c.ages)
        she, _, sex = _sex_words(p["sex"])
        reason = self.pick(c.reasons)
        symptoms = self.sample(c.symptoms, 2, 3)
        meds = self.sample(c.meds, 1, 2)
        header = self.pick(
            (
                f"{self.pick(_VISIT_TYPES)} - {self.fmt_date(p['visit'])}\n",
                f"{self.pick(_CLINICS)}\n{self.pick(_VISIT_TYPES)}, {self.fmt_date(p['visit'])}\n",
                f"CLINIC NOTE ({self.fmt_date(p['visit'])})\n",
            )
        )
        ident = self.pick(
            (
                f"Patient: {p['name']}, {p['age']}-year-old {sex}. DOB {self.fmt_date(p['dob'])}. MRN {p['mrn']}.",
                f"Name: {p['name']} | DOB: {self.fmt_date(p['dob'])}",
                f"{p['name']} (MRN {p['mrn']}) is a {p['age']}-year-old {sex}.",
            )
        )
        cc = self.pick(
            (f"Reason for visit: {reason}.", f"Chief complaint: {reason}.", f"CC: {reason}.")
        )
        hpi_style = self.rng.randrange(3)
        if hpi_style == 0:
            hpi = f"HPI: {p['first']} reports " + "; ".join(symptoms) + "."
        elif hpi_style == 1:
            hpi = f"History: {she.capitalize()} presents with {reason}. " + " ".join(
                s[0].upper() + s[1:] + "." for s in symptoms
            )
        else:
            hpi = "Symptoms: " + ", ".join(symptoms) + "."
        lines = [header + ident, cc, hpi]
        if self.rng.random() < 0.4:
            social = [
                x
                for x in _SOCIAL
                if not (("student" in x and p["age"] > 30) or ("retired" in x and p["age"] < 60))
            ]
            lines.append(f"Allergies: {self.pick(_ALLERGIES)}. Social: {self.pick(social)}.")
        lines.append(f"Vitals: {self.vitals(c.vitals, p['age'])}.")
        lines.append(f"Exam: {self.pick(c.findings)}.")
        lines.append(f"Assessment: {c.name}.")
        med_lines = [self.med_line(m) for m in meds]
        verb = self.pick(("Start", "Continue", "Increase to", "Prescribed"))
        if self.rng.random() < 0.5:
            lines.append("Medications: " + "; ".join(med_lines) + ".")
        else:
            lines.append(
                f"Rx: {verb} {med_lines[0]}" + "".join(f"; {m}" for m in med_lines[1:]) + "."
            )
        plan = self.sample(c.plans, 1, 2)
        tests = self.sample(c.tests, 0, 1)
        plan_text = "Plan: " + "; ".join(plan)
        if tests:
            plan_text += ". Orders: " + ", ".join(tests)
        lines.append(plan_text + ".")
        lines.append(
            self.pick(
                (
                    f"Follow-up in {self.pick(c.followup)}. Contact: {p['phone']}.",
                    f"Return visit in {self.pick(c.followup)}; patient can be reached at {p['phone']}.",
                    f"Follow up {self.pick(c.followup)}. Address on file: {p['street']}, {p['city']}, {p['state']} {p['zip']}.",
                )
            )
        )
        if self.rng.random() < 0.5:
            lines.append(f"Signed: {self.doctor()}")
        return "\n".join(lines)

    def portal_message(self) -> str:
        c = self.pick(_CONDITIONS)
        p = self.person(c.ages)
        doc = self.doctor()
        med = self.pick(c.meds)
        dose = self.pick(med.doses)
        since = self.pick(
            ("last Tuesday", "the start of the month", "my last visit", "Sunday", "the weekend")
        )
        ago = self.pick(
            (
                "last week",
                "three days ago",
                "about two weeks ago",
                "on Monday",
                "after my last visit",
            )
        )
        effect = self.pick(
            (
                "an upset stomach",
                "dizziness in the morning",
                "trouble sleeping",
                "a dry cough",
                "a mild headache",
                "more tiredness than usual",
            )
        )
        asks = (
            (
                "Refill request",
                f"Could you send a refill of my {med.name} {dose} to the pharmacy on file? I have "
                f"about {self.rng.randint(2, 6)} days left.",
            ),
            (
                "Question about medication",
                f"I started the {med.name} {dose} {ago} and I have {effect}. Should I keep taking it?",
            ),
            (
                "Still not better",
                f"My {c.complaint} has not improved since {since}. Do I need to come in, or can we "
                "talk by phone?",
            ),
            (
                "Work note",
                f"I need a note for work for my visit on {self.fmt_date(p['visit'])}. My employer is "
                f"{self.fake.company()}.",
            ),
            (
                "Test result question",
                f"Can you explain my {c.lab} result? The portal only shows numbers.",
            ),
        )
        subject, body = self.pick(asks)
        greeting = self.pick((f"Hi {doc},", f"Hello {doc},", f"Dear {doc},", "Hi,"))
        sign = self.pick(("Thank you,", "Thanks so much,", "Best,", "Regards,"))
        who = self.pick(("RN", "MA", "Nurse Line", doc))
        replies = {
            "Refill request": f"Refill sent. Please schedule a follow-up within {self.pick(c.followup)}.",
            "Question about medication": (
                f"{effect[0].upper() + effect[1:]} can happen early on. Keep taking it with food; "
                "if it gets worse, call the clinic."
            ),
            "Still not better": f"We scheduled a call for tomorrow morning at {p['phone']}.",
            "Work note": "The note is ready to download under Letters in the portal.",
            "Test result question": (
                f"Your result fits with your {c.name}. We will go over it at your next visit."
            ),
        }
        header = (
            f"Patient portal message | {self.fmt_date(p['visit'])}\n"
            f"From: {p['name']} (MRN {p['mrn']}, DOB {self.fmt_date(p['dob'])})\n"
            f"To: {doc}\nSubject: {subject}"
        )
        return (
            f"{header}\n\n{greeting}\n{body}\n{sign}\n{p['first']}\n\n"
            f"Reply ({who}): {replies[subject]}"
        )

    def support_ticket(self) -> str:
        p = self.person()
        r = self.rng
        ticket = r.randrange(10000, 999999)
        cats = (
            (
                "Billing",
                f"I was charged ${r.randint(25, 480)}.{r.randint(0, 99):02d} twice for my visit on "
                f"{self.fmt_date(p['visit'])}. Please refund the duplicate charge to my card ending in {r.randint(1000, 9999)}.",
                "Refund of the duplicate charge issued; allow 5 to 7 business days.",
            ),
            (
                "Account access",
                f"I cannot log in to the patient portal. The password reset e-mail never arrives at {p['email']}.",
                "Reset link re-sent after correcting a typo in the e-mail on file.",
            ),
            (
                "Address change",
                f"Please update my mailing address to {p['street']}, {p['city']}, {p['state']} {p['zip']}. "
                f"My phone number is still {p['phone']}.",
                "Address updated in all systems; confirmation letter mailed.",
            ),
            (
                "Pharmacy",
                f"My prescription for {self.med_line(self.pick(self.pick(_CONDITIONS).meds))} was sent "
                "to the wrong pharmacy. Can it be transferred?",
                "Prescription transferred; patient notified by text.",
            ),
            (
                "Appointments",
                f"I need to reschedule my appointment on {self.fmt_date(p['visit'])} because of a work trip. "
                f"Any afternoon next week works. Call me at {p['phone']}.",
                f"Rebooked for the following {self.pick(('Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday'))} at "
                f"{r.randint(1, 4)}:{self.pick(('00', '15', '30', '45'))} PM.",
            ),
            (
                "Insurance",
                f"My insurance changed to {self.fake.company()} Health Plan, member ID "
                f"{self.fake.bothify('??#######').upper()}. Please update my records before my next visit.",
                "Coverage verified and updated.",
            ),
            (
                "Records request",
                f"Please send my records from {p['visit'].year} to my new doctor. "
                f"Fax number: {self.fake.phone_number()}.",
                "Signed release received; records faxed.",
            ),
        )
        cat, body, resolution = self.pick(cats)
        priority = self.pick(("low", "normal", "normal", "high", "urgent"))
        channel = self.pick(("email", "phone", "web form", "chat"))
        status = self.pick(("Resolved", "Closed", "Pending customer", "Resolved"))
        agent = self.fake.first_name()
        lines = [
            f"Support ticket #{ticket} | Category: {cat} | Priority: {priority} | Channel: {channel}",
            f"Opened: {self.fmt_date(p['visit'])}",
            f"Customer: {p['name']} <{p['email']}>, DOB {self.fmt_date(p['dob'])}",
            f"Message: {body}",
            f"Agent ({agent}): {resolution}",
            f"Status: {status}",
        ]
        return "\n".join(lines)

    def referral_letter(self) -> str:
        c = self.pick(_CONDITIONS)
        p = self.person(c.ages)
        _, her, _ = _sex_words(p["sex"])
        spec = c.specialty
        doc_from, doc_to = self.doctor(), self.doctor()
        meds = "; ".join(self.med_line(m) for m in self.sample(c.meds, 1, 2))
        sym = ", ".join(self.sample(c.symptoms, 2, 3))
        return (
            f"{self.fmt_date(p['visit'])}\n"
            f"To: {doc_to}, {spec.capitalize() if spec != 'ENT' else spec}\n"
            f"Re: {p['name']}, DOB {self.fmt_date(p['dob'])}, {p['street']}, {p['city']}, {p['state']} {p['zip']}\n\n"
            f"Dear colleague,\n"
            f"Thank you for seeing {p['first']}, a {p['age']}-year-old patient of mine with {c.name}. "
            f"Relevant history: {sym}. Current medications: {meds}. "
            f"I would appreciate your assessment and recommendations regarding "
            f"{self.pick(('further work-up', 'treatment options', 'long-term management', 'whether a procedure is needed'))}. "
            f"{her.capitalize()} phone number is {p['phone']}.\n\n"
            f"Sincerely,\n{doc_from}, {self.pick(_CLINICS)}"
        )

    def lab_notice(self) -> str:
        p = self.person()
        r = self.rng
        labs = (
            ("Hemoglobin A1c", f"{round(r.uniform(5.0, 10.5), 1)}%", "below 5.7%"),
            ("LDL cholesterol", f"{r.randint(70, 210)} mg/dL", "below 100 mg/dL"),
            ("TSH", f"{round(r.uniform(0.2, 9.5), 2)} mIU/L", "0.4 to 4.0 mIU/L"),
            ("Hemoglobin", f"{round(r.uniform(9.5, 16.5), 1)} g/dL", "12.0 to 17.5 g/dL"),
            ("Creatinine", f"{round(r.uniform(0.6, 1.9), 2)} mg/dL", "0.6 to 1.3 mg/dL"),
            ("Vitamin D", f"{r.randint(9, 60)} ng/mL", "30 to 100 ng/mL"),
            ("Potassium", f"{round(r.uniform(3.2, 5.6), 1)} mmol/L", "3.5 to 5.0 mmol/L"),
        )
        chosen = self.sample(labs, 1, 3)
        results = "\n".join(f"- {n}: {v} (reference {ref})" for n, v, ref in chosen)
        advice = self.pick(
            (
                "No changes to your treatment are needed at this time.",
                "Please schedule a follow-up visit to discuss these results.",
                "We recommend repeating this test in 3 months.",
                "Your doctor has sent a new prescription to your pharmacy.",
            )
        )
        return (
            f"Lab results notice for {p['name']} (DOB {self.fmt_date(p['dob'])}, MRN {p['mrn']})\n"
            f"Collected {self.fmt_date(p['visit'])} at {self.pick(_CLINICS)}.\n"
            f"{results}\n{advice} Questions? Call {self.fake.phone_number()}.\n"
            f"Ordered by {self.doctor()}."
        )


MAX_RECORDS_PER_PATIENT = 30
COUNT_EXPONENT = 1.6  # P(a patient has k records) proportional to k^-1.6, k = 1 .. 30
AGE_SLACK = 2  # a patient's notes state ages within this many years of their first note's


def _date_forms(d: dt.date) -> list[str]:
    return [
        d.isoformat(),
        f"{d.month:02d}/{d.day:02d}/{d.year}",
        f"{d.strftime('%B')} {d.day}, {d.year}",
    ]


def _address(p: dict) -> str:
    return f"{p['street']}, {p['city']}, {p['state']} {p['zip']}"


class _Patients:
    """Groups records into patients, in record order, with a random stream of its own (so the
    records' draws are those of a corpus without patients).

    A record joins the earliest opened patient of the same sex whose first note states an age
    within :data:`AGE_SLACK` years and who still has room; otherwise it opens a patient with
    room for ``k`` records, ``k`` heavy-tailed (:data:`COUNT_EXPONENT`) in 1 .. 30.  A joining
    record's identity (name, first name, DOB, MRN, phone, e-mail, address) is replaced by the
    patient's, so one patient's notes name one person; its own age, visit, condition and
    pronouns (same sex) are kept."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(f"dptrain patients {seed}")
        ks = range(1, MAX_RECORDS_PER_PATIENT + 1)
        self.ks, self.weights = list(ks), [k**-COUNT_EXPONENT for k in ks]
        self.open: list[list] = []  # [patient id, identity, room left]
        self.count = 0

    def assign(self, p: dict, text: str) -> tuple[str, str]:
        for entry in self.open:
            pid, who, room = entry
            if who["sex"] == p["sex"] and abs(who["age"] - p["age"]) <= AGE_SLACK:
                entry[2] -= 1
                if entry[2] == 0:
                    self.open.remove(entry)
                return pid, _rename(text, p, who)
        pid = f"pat-{self.count:05d}"
        self.count += 1
        room = self.rng.choices(self.ks, self.weights)[0] - 1
        if room > 0:
            self.open.append([pid, p, room])
        return pid, text


def _rename(text: str, old: dict, new: dict) -> str:
    """``text`` with ``old``'s identity strings replaced by ``new``'s, in one pass (longest
    first, so a full name wins over a first name inside it)."""
    pairs = {
        _address(old): _address(new),
        old["name"]: new["name"],
        old["email"]: new["email"],
        old["mrn"]: new["mrn"],
        old["phone"]: new["phone"],
    }
    pairs.update(zip(_date_forms(old["dob"]), _date_forms(new["dob"]), strict=True))
    alternatives = sorted(pairs, key=len, reverse=True)
    pattern = "|".join(re.escape(a) for a in alternatives)
    pattern += r"|\b" + re.escape(old["first"]) + r"\b"
    pairs[old["first"]] = new["first"]
    return re.sub(pattern, lambda m: pairs[m.group(0)], text)


KINDS: dict[str, float] = {
    "clinic_note": 0.5,
    "portal_message": 0.17,
    "support_ticket": 0.15,
    "referral_letter": 0.1,
    "lab_notice": 0.08,
}


def generate(n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> Iterator[dict[str, str]]:
    """Yield ``n`` records ``{"id", "patient_id", "kind", "text"}``; deterministic in
    ``(n, seed)``, and a prefix of a longer corpus of the same seed."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = _Gen(seed)
    kinds = list(KINDS)
    weights = [KINDS[k] for k in kinds]
    makers: dict[str, Callable[[], str]] = {k: getattr(g, k) for k in kinds}
    patients = _Patients(seed)
    for i in range(n):
        kind = g.rng.choices(kinds, weights)[0]
        text = makers[kind]()
        pid, text = patients.assign(g.last_person, text)
        yield {"id": f"rec-{i:05d}", "patient_id": pid, "kind": kind, "text": text}


def write_jsonl(path: str | Path, n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> int:
    """Write ``generate(n, seed)`` to ``path`` as UTF-8 JSONL; return the byte count."""
    data = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in generate(n, seed))
    raw = data.encode("utf-8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(raw)
    return len(raw)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``python -m dptrain.data.synth --out F --n N --seed S``."""
    ap = argparse.ArgumentParser(
        prog="python -m dptrain.data.synth", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", required=True, help="output JSONL path ('-' for stdout)")
    ap.add_argument(
        "--n", type=int, default=DEFAULT_N, help=f"number of records (default {DEFAULT_N})"
    )
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed (default {DEFAULT_SEED})")
    args = ap.parse_args(argv)
    if args.out == "-":
        for rec in generate(args.n, args.seed):
            sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
        return 0
    size = write_jsonl(args.out, args.n, args.seed)
    print(f"wrote {args.n} records ({size} bytes) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
