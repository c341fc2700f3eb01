"""Generate the fine-tuning demonstration task: restaurant bookings in free text -> one line of JSON.

    python scripts/make_task.py --out examples/task          # train.jsonl, valid.jsonl, test.jsonl

Each example asks for the booking as JSON with the keys name, city, date (ISO, YYYY-MM-DD) and guests
(a number), and the answer is exactly ``{"name": "...", "city": "...", "date": "2024-03-07", "guests": 4}``.
Getting it right needs more than copying: dates arrive as "March 7, 2024", "7 Mar 2024" or "2024/03/07"
and become ISO; party sizes arrive as digits or words ("four") and become numbers.

The test split uses sentence templates that never occur in training (held out), and names and cities
that never occur in training either, so a model must extract, not remember. Everything comes from one
seeded generator: the same seed writes the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = ("Extract the booking as JSON with the keys name, city, date (YYYY-MM-DD) and guests (a number).\n\n")

TRAIN_TEMPLATES = [
    "Hi, this is {name}. I'd like a table for {guests} in {city} on {date}.",
    "Booking request from {name}: {guests} people, {city}, {date}.",
    "{name} here - can you reserve for {guests} at your {city} place on {date}?",
    "Please book {city} for {date}. Party of {guests}. Name: {name}.",
    "We are {guests}, eating in {city} on {date}; the reservation is under {name}.",
    "Reservation: {date} / {city} / {guests} guests / {name}",
    "Could I get a table on {date} in {city}? There will be {guests} of us. Thanks, {name}",
    "Name {name}, city {city}, date {date}, party size {guests}.",
    "{name} wants to dine in {city} with {guests} people on {date}.",
    "Hello! {name} booking for {guests} on {date} at the {city} restaurant.",
    "Table for {guests}, {date}, {city}. Contact: {name}.",
    "My name is {name} and I need a reservation in {city} for {guests} people on {date}.",
]
# Held out: only in the test split.
TEST_TEMPLATES = [
    "On {date}, {name} would like to bring {guests} guests to {city}.",
    "{city} please, {date}, for {guests} - booked by {name}.",
    "Dear team, {name} requests seating for {guests} on {date} in {city}.",
    "Group of {guests} led by {name}, visiting {city} on {date}, needs a table.",
]
FIRST = ["Priya", "Tom", "Amara", "Lukas", "Sofia", "Kenji", "Fatima", "Mateo", "Ingrid", "Omar", "Chloe", "Ravi",
         "Elena", "Jonas", "Aisha", "Marco", "Yuki", "Noah", "Leila", "Pavel", "Grace", "Diego", "Hana", "Felix",
         "Nadia", "Samuel", "Mei", "Oscar", "Zara", "Erik"]
LAST = ["Shah", "Becker", "Okafor", "Silva", "Novak", "Tanaka", "Haddad", "Rossi", "Larsen", "Kim", "Dubois",
        "Patel", "Moreno", "Fischer", "Nguyen", "Costa", "Ahmed", "Jensen", "Ivanova", "Murphy", "Garcia", "Sato",
        "Weber", "Mendes", "Hughes", "Popescu", "Wright", "Kowalski", "Ito", "Bauer"]
CITIES = ["Lisbon", "Oslo", "Madrid", "Vienna", "Dublin", "Prague", "Athens", "Zurich", "Lyon", "Porto", "Munich",
          "Krakow", "Seville", "Bergen", "Utrecht", "Turin", "Ghent", "Tallinn", "Bologna", "Malaga", "Geneva",
          "Antwerp", "Leeds", "Bristol", "Nantes", "Graz", "Cork", "Split", "Riga", "Vilnius"]
# Held out names and cities (test only).
TEST_FIRST = ["Astrid", "Bruno", "Carmen", "Dmitri", "Esme", "Farid"]
TEST_LAST = ["Lindqvist", "Ferreira", "Romano", "Volkov", "Castillo", "Brennan"]
TEST_CITIES = ["Hamburg", "Valencia", "Edinburgh", "Florence", "Salzburg", "Bruges"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


def date_text(rng: random.Random, year: int, month: int, day: int) -> str:
    """A date in one of four spellings."""
    style = rng.randrange(4)
    if style == 0:
        return f"{MONTHS[month - 1]} {day}, {year}"
    if style == 1:
        return f"{day} {MONTHS[month - 1]} {year}"
    if style == 2:
        return f"{day} {MONTHS[month - 1][:3]} {year}"
    return f"{year}/{month:02d}/{day:02d}"


def example(rng: random.Random, templates: list[str], first: list[str], last: list[str], cities: list[str]) -> dict:
    name = f"{rng.choice(first)} {rng.choice(last)}"
    city = rng.choice(cities)
    year, month = rng.randint(2024, 2026), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    guests = rng.randint(1, 12)
    guests_text = NUMBER_WORDS[guests - 1] if rng.random() < 0.5 else str(guests)
    text = rng.choice(templates).format(name=name, city=city, date=date_text(rng, year, month, day),
                                        guests=guests_text)
    answer = json.dumps({"name": name, "city": city, "date": f"{year}-{month:02d}-{day:02d}", "guests": guests})
    return {"messages": [{"role": "user", "content": INSTRUCTION + text}, {"role": "assistant", "content": answer}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="examples/task", help="output folder (default examples/task)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train", type=int, default=2000, help="training examples (training templates)")
    parser.add_argument("--valid", type=int, default=100, help="validation examples (training templates)")
    parser.add_argument("--test", type=int, default=200, help="test examples (held-out templates, names, cities)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": [example(rng, TRAIN_TEMPLATES, FIRST, LAST, CITIES) for _ in range(args.train)],
        "valid": [example(rng, TRAIN_TEMPLATES, FIRST, LAST, CITIES) for _ in range(args.valid)],
        "test": [example(rng, TEST_TEMPLATES, TEST_FIRST, TEST_LAST, TEST_CITIES) for _ in range(args.test)],
    }
    for name, rows in splits.items():
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()
