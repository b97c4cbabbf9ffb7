"""A built-in suite of small instruction tasks, generated from a seed: no downloads needed.

It mirrors the shape of Natural Instructions at toy scale: each *family* is a task with a
plain-English definition, a category, and a generator of ``(input, answer)`` pairs. Answers
are short and unambiguous, since evaluation scores greedy generations of a 135M model with
Rouge-L, and inputs are drawn from a few hundred words, names and numbers, so a model must
follow the instruction rather than memorise answers. Holding out whole categories then
measures generalisation to unseen kinds of task, as FlexLoRA does with NI.

A family is one small function registered with ``@family(category, definition)``; it
receives a seeded ``random.Random`` and returns ``(input, answer)``.
"""

from __future__ import annotations

import calendar
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flexfed.data.sampling import rng
from flexfed.data.types import Example, Task
from flexfed.data.vocabulary import (
    ANIMALS,
    BAD,
    CITIES,
    COLORS,
    FRUITS,
    GOOD,
    ITEMS,
    NAMES,
    NEUTRAL_ADJECTIVES,
    OBJECTS,
    PLACES,
    WORDS,
)

Generator = Callable[[random.Random], tuple[str, str]]


@dataclass(frozen=True)
class Family:
    name: str
    category: str
    definition: str
    generate: Generator


FAMILIES: dict[str, Family] = {}


def family(category: str, definition: str) -> Callable[[Generator], Generator]:
    """Register a generator as a task family named after the function."""

    def register(generate: Generator) -> Generator:
        FAMILIES[generate.__name__] = Family(generate.__name__, category, definition, generate)
        return generate

    return register


def builtin_suite(seed: int = 0, examples_per_task: int = 64, families: Sequence[str] | None = None) -> list[Task]:
    """One Task per family (all of them unless ``families`` names some), in registration order.

    Inputs are distinct within a task, so held-out examples never repeat a training input. A
    family whose input space is smaller than ``examples_per_task`` yields fewer examples
    (all of the default families reach 64). Same seed, same suite; each family draws from
    its own generator, so adding a family never changes another's examples.
    """
    if examples_per_task < 1:
        raise ValueError(f"examples_per_task must be >= 1, got {examples_per_task}")
    names = list(FAMILIES) if families is None else list(families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown builtin families {unknown}; known: {sorted(FAMILIES)}")
    return [_task(FAMILIES[name], seed, examples_per_task) for name in names]


def _task(fam: Family, seed: int, n: int) -> Task:
    r = rng(seed, "builtin", fam.name)
    answers: dict[str, str] = {}  # input -> answer, in the order drawn
    for _ in range(50 * n):
        if len(answers) == n:
            break
        prompt, answer = fam.generate(r)
        answers.setdefault(prompt, answer)
    examples = tuple(Example(input=i, outputs=(a,)) for i, a in answers.items())
    return Task(name=fam.name, category=fam.category, definition=fam.definition, examples=examples)


# ---------------------------------------------------------------- helpers

SHORT_WORDS = tuple(w for w in WORDS if len(w) <= 7)
WEEKDAYS = tuple(calendar.day_name)  # Monday first
MONTHS = tuple(calendar.month_name)[1:]
KINDS = {"animal": ANIMALS, "fruit": FRUITS, "color": COLORS}


def words(r: random.Random, low: int, high: int, pool: Sequence[str] = WORDS) -> list[str]:
    return r.sample(pool, r.randint(low, high))


def commas(items: Sequence[object]) -> str:
    return ", ".join(str(i) for i in items)


def two_distinct(r: random.Random, low: int, high: int) -> tuple[int, int]:
    a, b = r.sample(range(low, high + 1), 2)
    return a, b


def in_words(n: int) -> str:
    """English words for 0 <= n <= 999, e.g. 342 -> 'three hundred forty-two'."""
    ones = (
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen"
    ).split()
    tens = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
    if n < 20:
        return ones[n]
    if n < 100:
        return tens[n // 10] + ("" if n % 10 == 0 else "-" + ones[n % 10])
    rest = n % 100
    return f"{ones[n // 100]} hundred" + ("" if rest == 0 else " " + in_words(rest))


def roman(n: int) -> str:
    numerals = [(100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
    out = ""
    for value, letters in numerals:
        count, n = divmod(n, value)
        out += letters * count
    return out


def clock(minutes: int) -> str:
    return f"{minutes // 60 % 24:02d}:{minutes % 60:02d}"


# ---------------------------------------------------------------- string manipulation


@family("string", "Write the given word backwards, letter by letter.")
def reverse_word(r):
    w = r.choice(WORDS)
    return w, w[::-1]


@family("string", "Rewrite the text in capital letters.")
def uppercase(r):
    text = " ".join(words(r, 2, 3))
    return text, text.upper()


@family("string", "Write the first letter of every word, in order, as a single lowercase word.")
def initials(r):
    ws = words(r, 3, 5)
    return " ".join(ws), "".join(w[0] for w in ws)


@family("string", "Remove every vowel (a, e, i, o, u) from the word and write the letters that are left.")
def remove_vowels(r):
    w = r.choice(WORDS)
    return w, "".join(c for c in w if c not in "aeiou")


@family("string", "Spell the word with a hyphen between each pair of neighbouring letters.")
def hyphenate(r):
    w = r.choice(SHORT_WORDS)
    return w, "-".join(w)


@family("string", "Join the words into one word by removing the spaces between them.")
def join_words(r):
    ws = words(r, 2, 3)
    return " ".join(ws), "".join(ws)


@family("string", "Write the word as many times as the number says, with a space between the copies.")
def repeat_word(r):
    w, k = r.choice(SHORT_WORDS), r.randint(2, 4)
    return f"Word: {w}\nNumber: {k}", " ".join([w] * k)


# ---------------------------------------------------------------- list manipulation


@family("list", "Sort the words in alphabetical order and write them separated by commas.")
def sort_words(r):
    ws = words(r, 3, 5)
    return commas(ws), commas(sorted(ws))


@family("list", "Sort the numbers from smallest to largest and write them separated by commas.")
def sort_numbers(r):
    ns = r.sample(range(100), r.randint(3, 5))
    return commas(ns), commas(sorted(ns))


@family("list", "Write the items of the list in reverse order, separated by commas.")
def reverse_list(r):
    ws = words(r, 3, 5)
    return commas(ws), commas(ws[::-1])


@family("list", "Write the last item of the list.")
def last_item(r):
    ws = words(r, 3, 6)
    return commas(ws), ws[-1]


@family("list", "Write the item at the given position in the list. The first item is at position 1.")
def item_at(r):
    ws = words(r, 3, 6)
    k = r.randint(1, len(ws))
    return f"List: {commas(ws)}\nPosition: {k}", ws[k - 1]


@family("list", "Remove repeated items from the list, keeping the first copy of each; separate the rest by commas.")
def remove_duplicates(r):
    base = words(r, 2, 4)
    items = base + r.choices(base, k=r.randint(1, 3))
    r.shuffle(items)
    return commas(items), commas(dict.fromkeys(items))


# ---------------------------------------------------------------- arithmetic


@family("arithmetic", "Add the two numbers and write the sum.")
def add(r):
    a, b = r.randint(0, 499), r.randint(0, 499)
    return f"{a} and {b}", str(a + b)


@family("arithmetic", "Subtract the second number from the first and write the result.")
def subtract(r):
    a = r.randint(10, 500)
    b = r.randint(0, a)
    return f"{a} and {b}", str(a - b)


@family("arithmetic", "Multiply the two numbers and write the product.")
def multiply(r):
    a, b = r.randint(2, 12), r.randint(2, 30)
    return f"{a} and {b}", str(a * b)


@family("arithmetic", "Add up all the numbers in the list and write the total.")
def sum_list(r):
    ns = [r.randint(1, 50) for _ in range(r.randint(3, 5))]
    return commas(ns), str(sum(ns))


@family("arithmetic", "Divide the first number by the second and write only the remainder.")
def remainder(r):
    a, b = r.randint(10, 200), r.randint(2, 12)
    return f"{a} and {b}", str(a % b)


@family("arithmetic", "Write the difference between the largest and the smallest number in the list.")
def list_range(r):
    ns = r.sample(range(100), r.randint(3, 6))
    return commas(ns), str(max(ns) - min(ns))


# ---------------------------------------------------------------- classification by a stated rule


@family("classification", 'Answer "even" if the number is even and "odd" if it is odd.')
def parity(r):
    n = r.randint(0, 9999)
    return str(n), "even" if n % 2 == 0 else "odd"


@family("classification", 'Answer "positive" if the number is above zero and "negative" if it is below zero.')
def sign(r):
    n = r.choice([-1, 1]) * r.randint(1, 999)
    return str(n), "positive" if n > 0 else "negative"


@family("classification", 'Say what the word names: answer "animal", "fruit" or "color".')
def kind_of_word(r):
    kind = r.choice(list(KINDS))
    return r.choice(KINDS[kind]), kind


@family("classification", 'Answer "positive" if the short review praises the thing and "negative" if it complains.')
def review_sentiment(r):
    label = r.choice(["positive", "negative"])
    a, b = r.sample(GOOD if label == "positive" else BAD, 2)
    return f"The {r.choice(OBJECTS + PLACES)} was {a} and {b}.", label


@family("classification", 'Answer "yes" if the word starts with a vowel (a, e, i, o, u) and "no" otherwise.')
def starts_with_vowel(r):
    w = r.choice(WORDS)
    return w, "yes" if w[0] in "aeiou" else "no"


@family("classification", 'Answer "long" if the word has more than five letters and "short" otherwise.')
def word_length_class(r):
    w = r.choice(WORDS)
    return w, "long" if len(w) > 5 else "short"


@family("classification", 'Answer "yes" if the number can be divided by 3 with no remainder and "no" otherwise.')
def divisible_by_three(r):
    n = r.randint(1, 9999)
    return str(n), "yes" if n % 3 == 0 else "no"


# ---------------------------------------------------------------- extraction


@family("extraction", "Write the name of the person mentioned in the sentence.")
def person_name(r):
    name, obj, place = r.choice(NAMES), r.choice(OBJECTS), r.choice(PLACES)
    sentence = r.choice([
        f"Yesterday {name} bought a {r.choice(NEUTRAL_ADJECTIVES)} {obj} at the {place}.",
        f"{name} went to the {place} with a {obj}.",
        f"The {obj} near the {place} belongs to {name}.",
    ])
    return sentence, name


@family("extraction", "Write the number that appears in the sentence, using digits.")
def number_in_sentence(r):
    n, name, place = r.randint(2, 999), r.choice(NAMES), r.choice(PLACES)
    sentence = r.choice([
        f"{name} walked {n} steps to the {place}.",
        f"There were {n} people at the {place} today.",
        f"The {place} sold {n} {r.choice(ITEMS)[1]} this week.",
    ])
    return sentence, str(n)


@family("extraction", "Write the name of the city mentioned in the sentence.")
def city_in_sentence(r):
    city, name, place = r.choice(CITIES), r.choice(NAMES), r.choice(PLACES)
    sentence = r.choice([
        f"{name} moved to {city} last year.",
        f"The {place} in {city} opens at nine.",
        f"{name} took a train from {city} to see a {place}.",
    ])
    return sentence, city


@family("extraction", "Write the domain of the email address: the part after the @ sign.")
def email_domain(r):
    domain = f"{r.choice(WORDS)}.{r.choice(['com', 'org', 'net', 'io'])}"
    return f"{r.choice(NAMES).lower()}.{r.choice(SHORT_WORDS)}@{domain}", domain


@family("extraction", "Write the word that appears inside the quotation marks.")
def quoted_word(r):
    w = r.choice(WORDS)
    return f'{r.choice(NAMES)} wrote the word "{w}" on the {r.choice(OBJECTS)}.', w


@family("extraction", "Write the value that belongs to the requested key.")
def key_value(r):
    pools = {"color": COLORS, "animal": ANIMALS, "fruit": FRUITS, "city": CITIES, "name": NAMES, "object": OBJECTS}
    keys = r.sample(list(pools), r.randint(3, 4))
    record = {k: r.choice(pools[k]) for k in keys}
    key = r.choice(keys)
    return "; ".join(f"{k}: {v}" for k, v in record.items()) + f"\nKey: {key}", record[key]


# ---------------------------------------------------------------- formatting and conversion


@family("conversion", "Write the number in English words, with a hyphen in numbers like forty-two.")
def number_to_words(r):
    n = r.randint(0, 999)
    return str(n), in_words(n)


@family("conversion", "Write the number spelled out in words as digits.")
def words_to_number(r):
    n = r.randint(0, 999)
    return in_words(n), str(n)


@family("conversion", "Rewrite the phrase in snake_case: lowercase words joined by underscores.")
def snake_case(r):
    ws = words(r, 2, 4)
    return " ".join(ws), "_".join(ws)


@family("conversion", "Rewrite the phrase in camelCase: no spaces, and every word but the first starts with a capital.")
def camel_case(r):
    ws = words(r, 2, 4)
    return " ".join(ws), ws[0] + "".join(w.capitalize() for w in ws[1:])


@family("conversion", 'Write the person\'s name and age as a JSON object with the keys "name" and "age".')
def to_json(r):
    name, age = r.choice(NAMES), r.randint(3, 95)
    return f"{name} is {age} years old and lives in {r.choice(CITIES)}.", json.dumps({"name": name, "age": age})


@family("conversion", "Write the number in Roman numerals.")
def roman_numeral(r):
    n = r.randint(1, 399)
    return str(n), roman(n)


# ---------------------------------------------------------------- word problems

WORD_PROBLEM = "Solve the word problem. Answer with the number only."


@family("word_problem", WORD_PROBLEM)
def buy_more(r):
    name, (_, things), a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 60), r.randint(2, 40)
    return f"{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?", str(a + b)


@family("word_problem", WORD_PROBLEM)
def give_away(r):
    name, (_, things), a = r.choice(NAMES), r.choice(ITEMS), r.randint(5, 90)
    b = r.randint(1, a - 1)
    return f"{name} had {a} {things} and gave {b} of them away. How many {things} are left?", str(a - b)


@family("word_problem", WORD_PROBLEM)
def boxes(r):
    name, (_, things), a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 9), r.randint(2, 12)
    return f"{name} has {a} boxes with {b} {things} in each box. How many {things} are there in all?", str(a * b)


@family("word_problem", WORD_PROBLEM)
def share_equally(r):
    name, (_, things), each, friends = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 12), r.randint(2, 8)
    total = each * friends
    question = f"{name} shares {total} {things} equally among {friends} friends. How many {things} does each get?"
    return question, str(each)


@family("word_problem", WORD_PROBLEM)
def total_price(r):
    (thing, things), price, count = r.choice(ITEMS), r.randint(1, 20), r.randint(2, 9)
    return f"One {thing} costs {price} dollars. How many dollars do {count} {things} cost?", str(price * count)


@family("word_problem", WORD_PROBLEM)
def age_later(r):
    name, age, years = r.choice(NAMES), r.randint(2, 70), r.randint(1, 30)
    return f"{name} is {age} years old. How old will {name} be in {years} years?", str(age + years)


# ---------------------------------------------------------------- comparison and logic


@family("comparison", "Write the larger of the two numbers.")
def larger_number(r):
    a, b = two_distinct(r, 0, 999)
    return f"{a}, {b}", str(max(a, b))


@family("comparison", "Write the smaller of the two numbers.")
def smaller_number(r):
    a, b = two_distinct(r, 0, 999)
    return f"{a}, {b}", str(min(a, b))


@family("comparison", "Write the word that comes first in alphabetical order.")
def first_alphabetically(r):
    a, b = r.sample(WORDS, 2)
    return f"{a}, {b}", min(a, b)


@family("comparison", "Write the word that has more letters.")
def longer_word(r):
    a, b = r.sample(WORDS, 2)
    while len(a) == len(b):
        b = r.choice(WORDS)
    return f"{a}, {b}", max(a, b, key=len)


@family("comparison", 'Answer "yes" if the first number is greater than the second and "no" otherwise.')
def greater_than(r):
    a, b = r.randint(0, 999), r.randint(0, 999)
    return f"{a}, {b}", "yes" if a > b else "no"


@family("comparison", 'Work out the logical expression and answer "True" or "False". "not" negates the next value.')
def boolean_logic(r):
    def operand():
        value = r.choice([True, False])
        negated = r.random() < 0.4
        return ("not " if negated else "") + str(value), value != negated

    (a, va), (b, vb), (c, vc) = operand(), operand(), operand()
    op1, op2 = r.choice(["and", "or"]), r.choice(["and", "or"])
    inner = (va and vb) if op1 == "and" else (va or vb)
    result = (inner and vc) if op2 == "and" else (inner or vc)
    return f"({a} {op1} {b}) {op2} {c}", str(result)


# ---------------------------------------------------------------- counting


@family("counting", "Count the letters in the word and write the count as a number.")
def count_letters(r):
    w = r.choice(WORDS)
    return w, str(len(w))


@family("counting", "Count the words in the sentence and write the count as a number.")
def count_words(r):
    ws = words(r, 3, 9)
    return " ".join(ws).capitalize() + ".", str(len(ws))


@family("counting", "Count how many times the letter appears in the word and write the count as a number.")
def count_letter(r):
    w = r.choice(WORDS)
    letter = r.choice(w) if r.random() < 0.8 else r.choice("abcdefghijklmnopqrstuvwxyz")
    return f"Word: {w}\nLetter: {letter}", str(w.count(letter))


@family("counting", "Count the vowels (a, e, i, o, u) in the word and write the count as a number.")
def count_vowels(r):
    w = r.choice(WORDS)
    return w, str(sum(c in "aeiou" for c in w))


@family("counting", "Count the items in the list and write the count as a number.")
def count_items(r):
    ws = words(r, 2, 9)
    return commas(ws), str(len(ws))


@family("counting", "Count how many words in the list name animals and write the count as a number.")
def count_animals(r):
    animals = r.sample(ANIMALS, r.randint(0, 4))
    items = animals + r.sample(OBJECTS, r.randint(1, 4))
    r.shuffle(items)
    return commas(items), str(len(animals))


# ---------------------------------------------------------------- date and time


@family("datetime", "Write the day of the week that comes the given number of days after the given day.")
def weekday_after(r):
    day, k = r.randrange(7), r.randint(1, 30)
    return f"{k} days after {WEEKDAYS[day]}", WEEKDAYS[(day + k) % 7]


@family("datetime", "Write the month that comes the given number of months after the given month.")
def month_after(r):
    month, k = r.randrange(12), r.randint(1, 24)
    return f"{k} months after {MONTHS[month]}", MONTHS[(month + k) % 12]


@family("datetime", "Add the hours to the time on a 24-hour clock and write the new time as HH:MM.")
def add_hours(r):
    start, hours = r.randrange(0, 24 * 60, 5), r.randint(1, 12)
    return f"Time: {clock(start)}\nAdd: {hours} hours", clock(start + 60 * hours)


@family("datetime", "Write how many days the month has in the given year.")
def days_in_month(r):
    month, year = r.randint(1, 12), r.randint(1950, 2050)
    return f"{MONTHS[month - 1]} {year}", str(calendar.monthrange(year, month)[1])


@family("datetime", "Rewrite the date, given as year-month-day, in the form Month Day, Year (e.g. March 5, 2021).")
def date_in_words(r):
    year, month = r.randint(1950, 2050), r.randint(1, 12)
    day = r.randint(1, calendar.monthrange(year, month)[1])
    return f"{year}-{month:02d}-{day:02d}", f"{MONTHS[month - 1]} {day}, {year}"


@family("datetime", "Write the number of minutes as hours and minutes in the form H:MM.")
def minutes_to_hours(r):
    minutes = r.randint(61, 719)
    return f"{minutes} minutes", f"{minutes // 60}:{minutes % 60:02d}"
