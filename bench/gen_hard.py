"""Generate hard recall-benchmark conversations (JSONL, the format ``bench/recall.py`` reads).

Each case: ``--facts`` facts about the user and ``--others`` facts of the same kinds about other
people (or, now and then, about the user's past: "I grew up in Galway."), shuffled, each answered
"Thanks, I'll remember that."; then ``--filler`` general-knowledge Q/A turns; then a question about
one of the user's facts. In every ``--update-every``-th case a "Quick correction: ..." in the middle
of the filler supersedes the asked fact (kind ``update``; the answer is the corrected value and the
superseded value is among the candidates). Candidates: the answer first, then 4 distractors of the
same slot, preferring values that appear in the conversation.

The material (slots, wordings, values, relations, filler) is this module's own, written apart from
the shared dev file so that the benchmark is not tuned to it. Output is deterministic for a seed.
The facts, question and candidates of case i depend only on the seed and i, not on ``--filler``
or ``--cases``: ``--filler 16/32/64`` give the same cases with 1x/2x/4x the filler turns, and the
correction sits at the same relative position in the filler.

    python bench/gen_hard.py --cases 60 --filler 64 --seed 1 -o bench/out/hard-f64.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from typing import Any

ACK = "Thanks, I'll remember that."
ACK_UPDATE = "Got it, I've updated that."
CORRECTION_PREFIX = "Quick correction: "
N_DISTRACTORS = 4
PAST_RATE = 0.2  # chance that an "other" fact is the user's own past value (when the slot has one)
CORRECTION_SPAN = (0.25, 0.75)  # where in the filler the correction goes (fraction of the turns)


@dataclass(frozen=True)
class Slot:
    """One kind of fact. Templates use ``{v}`` (the value) and, for other people, ``{rel}``."""

    key: str
    user: tuple[str, ...]  # the user's own fact (also used, after CORRECTION_PREFIX, to correct it)
    other: tuple[str, ...]  # the same kind of fact about another person
    past: tuple[str, ...]  # the user's former value (a same-slot distractor); may be empty
    questions: tuple[str, ...]
    answer_template: str
    values: tuple[str, ...]
    family_ok: bool = True  # False: "My aunt has a brother called ..." would read oddly


SLOTS: tuple[Slot, ...] = (
    Slot(
        key="name",
        user=("My name is {v}.", "You can call me {v}.", "I'm {v}, by the way.",
              "Everyone calls me {v}."),
        other=("My {rel} is called {v}.", "My {rel}'s name is {v}.", "My {rel} goes by {v}."),
        past=(),
        questions=("What is my name?", "What am I called?", "Do you remember my name?",
                   "What name did I tell you?"),
        answer_template="Your name is {v}.",
        values=("Teodor", "Marisol", "Oskar", "Priya", "Emeka", "Solveig", "Rafael", "Annika",
                "Kenji", "Beatriz", "Tomasz", "Yasmin", "Lorenzo", "Freya", "Dario", "Nadia",
                "Mateus", "Ilse"),
    ),
    Slot(
        key="cat",
        user=("My cat is called {v}.", "I have a cat named {v}.", "My cat's name is {v}."),
        other=("My {rel} has a cat named {v}.", "My {rel}'s cat is called {v}."),
        past=("My childhood cat was called {v}.",),
        questions=("What is my cat called?", "What's my cat's name?",
                   "Remind me, what is my cat's name?", "What did I say my cat is called?"),
        answer_template="Your cat is called {v}.",
        values=("Pickle", "Marmalade", "Juniper", "Clementine", "Pudding", "Sardine", "Noodle",
                "Gizmo", "Nugget", "Pumpkin", "Sprout", "Custard", "Domino", "Figaro", "Tinsel",
                "Bramble", "Waffle"),
    ),
    Slot(
        key="city",
        user=("I live in {v}.", "I'm based in {v}.", "Home for me is {v} these days.",
              "My flat is in {v}."),
        other=("My {rel} lives in {v}.", "My {rel} just moved to {v}.",
               "My {rel} is based in {v}."),
        past=("I grew up in {v}.",),
        questions=("Which city do I live in?", "Where do I live?", "Where am I based?",
                   "What city is my home?"),
        answer_template="You live in {v}.",
        values=("Lisbon", "Tallinn", "Montreal", "Osaka", "Valencia", "Krakow", "Edinburgh",
                "Adelaide", "Bergen", "Porto", "Nairobi", "Ljubljana", "Cordoba", "Dresden",
                "Antwerp", "Galway", "Quito"),
    ),
    Slot(
        key="colour",
        user=("My favourite colour is {v}.", "I like {v} more than any other colour.",
              "The colour I love most is {v}."),
        other=("My {rel}'s favourite colour is {v}.", "My {rel} loves the colour {v}."),
        past=("When I was little my favourite colour was {v}.",),
        questions=("What is my favourite colour?", "Which colour do I like most?",
                   "What colour did I say I love?"),
        answer_template="Your favourite colour is {v}.",
        values=("lavender", "mustard", "charcoal", "periwinkle", "burgundy", "lilac", "cobalt",
                "ochre", "emerald", "magenta", "cerulean", "scarlet", "chartreuse", "mauve",
                "saffron", "tangerine", "sepia"),
    ),
    Slot(
        key="job",
        user=("I work as a {v}.", "I'm a {v} by profession.", "By trade I'm a {v}.",
              "I earn my living as a {v}."),
        other=("My {rel} works as a {v}.", "My {rel} is a {v}.",
               "My {rel} earns a living as a {v}."),
        past=("Before my current job I worked as a {v}.",),
        questions=("What is my job?", "What do I do for a living?", "What is my profession?",
                   "What do I work as?"),
        answer_template="You work as a {v}.",
        values=("veterinarian", "pharmacist", "translator", "surveyor", "physiotherapist",
                "locksmith", "beekeeper", "cartographer", "paramedic", "tailor", "journalist",
                "geologist", "welder", "stonemason", "midwife", "zookeeper", "florist",
                "sommelier"),
    ),
    Slot(
        key="bike_code",
        user=("My bike lock code is {v}.", "The combination for my bike lock is {v}.",
              "I open my bike lock with {v}."),
        other=("My {rel}'s bike lock code is {v}.", "My {rel}'s bike lock opens with {v}."),
        past=("My old bike lock used to open with {v}.",),
        questions=("What is my bike lock code?", "What's the combination for my bike lock?",
                   "Which code opens my bike lock?", "Tell me my bike lock code."),
        answer_template="Your bike lock code is {v}.",
        values=("4072", "8315", "2649", "7193", "5827", "3061", "9458", "1736", "6284", "2907",
                "8540", "3372", "7619", "5183", "4925", "6801", "1594"),
    ),
    Slot(
        key="brother",
        user=("My brother is named {v}.", "I have a brother called {v}.",
              "My brother's name is {v}."),
        other=("My {rel}'s brother is named {v}.", "My {rel} has a brother called {v}."),
        past=(),
        questions=("What is my brother's name?", "What's my brother called?",
                   "What did I say my brother is called?"),
        answer_template="Your brother is called {v}.",
        values=("Callum", "Anselm", "Jonas", "Bartek", "Eamon", "Kofi", "Matthias", "Sven",
                "Thiago", "Idris", "Florian", "Niko", "Quentin", "Rohan", "Yusuf", "Leif",
                "Ruben"),
        family_ok=False,
    ),
    Slot(
        key="food",
        user=("My favourite food is {v}.", "Nothing beats {v} for me.",
              "If I could only eat one dish, it would be {v}."),
        other=("My {rel}'s favourite food is {v}.", "My {rel} is crazy about {v}."),
        past=("As a child I loved {v} most.",),
        questions=("What is my favourite food?", "Which dish do I like most?",
                   "What food did I say I love?"),
        answer_template="Your favourite food is {v}.",
        values=("gnocchi", "arancini", "moussaka", "goulash", "biryani", "shakshuka", "pad thai",
                "ceviche", "borscht", "jambalaya", "tagine", "bibimbap", "enchiladas", "khachapuri",
                "laksa", "katsu curry", "kimchi stew"),
    ),
    Slot(
        key="car",
        user=("I drive a {v}.", "My car is a {v}.", "I get around in a {v}."),
        other=("My {rel} drives a {v}.", "My {rel}'s car is a {v}."),
        past=("I used to drive a {v}.",),
        questions=("What car do I drive?", "What make is my car?", "Which brand is my car?"),
        answer_template="You drive a {v}.",
        values=("Subaru", "Volvo", "Peugeot", "Skoda", "Mazda", "Hyundai", "Renault", "Fiat",
                "Toyota", "Citroen", "Nissan", "Lancia", "Dacia", "Saab", "Tesla", "Porsche",
                "Mitsubishi"),
    ),
    Slot(
        key="birthday",
        user=("My birthday is on {v}.", "I was born on {v}.", "I celebrate my birthday on {v}."),
        other=("My {rel}'s birthday is on {v}.", "My {rel} was born on {v}."),
        past=(),
        questions=("When is my birthday?", "What date is my birthday?", "On what day was I born?"),
        answer_template="Your birthday is on {v}.",
        values=("12 January", "27 February", "18 March", "23 April", "11 May", "29 June",
                "16 July", "24 August", "13 September", "28 October", "19 November",
                "22 December", "25 January", "17 April", "26 June", "14 August", "21 October"),
    ),
    Slot(
        key="sport",
        user=("My favourite sport is {v}.", "The sport I enjoy most is {v}.",
              "My sport of choice is {v}."),
        other=("My {rel}'s favourite sport is {v}.", "My {rel} is obsessed with {v}."),
        past=("At school my sport was {v}.",),
        questions=("What is my favourite sport?", "Which sport do I enjoy most?",
                   "What sport did I say I love?"),
        answer_template="Your favourite sport is {v}.",
        values=("badminton", "fencing", "rowing", "curling", "handball", "volleyball",
                "lacrosse", "squash", "archery", "table tennis", "water polo", "cricket", "rugby",
                "judo", "kayaking", "bouldering", "netball"),
    ),
    Slot(
        key="instrument",
        user=("I play the {v}.", "I've been learning the {v} for years.",
              "My instrument is the {v}."),
        other=("My {rel} plays the {v}.", "My {rel} has taken up the {v}."),
        past=("At school I played the {v}.",),
        questions=("What instrument do I play?", "Which instrument do I play?",
                   "What did I say my instrument is?"),
        answer_template="You play the {v}.",
        values=("cello", "trombone", "clarinet", "banjo", "oboe", "accordion", "mandolin",
                "bassoon", "saxophone", "harmonica", "xylophone", "tuba", "sitar", "bagpipes",
                "flute", "double bass", "marimba"),
    ),
    Slot(
        key="language",
        user=("I'm learning {v}.", "I'm taking evening classes in {v}.",
              "The language I'm studying is {v}."),
        other=("My {rel} is learning {v}.", "My {rel} is taking classes in {v}."),
        past=("At school I studied {v}.",),
        questions=("Which language am I learning?", "What language am I studying?",
                   "What language did I say I'm learning?"),
        answer_template="You are learning {v}.",
        values=("Portuguese", "Japanese", "Swahili", "Finnish", "Korean", "Turkish", "Greek",
                "Dutch", "Polish", "Hungarian", "Icelandic", "Welsh", "Tagalog", "Hebrew", "Czech",
                "Vietnamese", "Norwegian"),
    ),
)

RELATIONS: tuple[str, ...] = (
    "aunt", "uncle", "colleague", "neighbour", "cousin", "grandmother", "grandfather", "flatmate",
    "best friend", "niece", "nephew", "teammate", "landlord", "godmother", "classmate", "manager",
    "stepfather", "sister-in-law",
)
FAMILY = frozenset({"aunt", "uncle", "cousin", "grandmother", "grandfather", "niece", "nephew",
                    "godmother", "stepfather", "sister-in-law"})

# (question, one-sentence answer); none of them may mention a slot value (checked by tests).
FILLER: tuple[tuple[str, str], ...] = (
    ("What causes the seasons on Earth?",
     "The tilt of Earth's axis changes how directly sunlight reaches each hemisphere during the "
     "year."),
    ("How far away is the Moon?", "On average it is about 384,000 kilometres from Earth."),
    ("Why do leaves change colour in autumn?",
     "Trees stop making chlorophyll, so the yellow and orange pigments underneath show through."),
    ("What is the boiling point of water at sea level?",
     "Water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit."),
    ("How do rainbows form?",
     "Sunlight is bent and reflected inside raindrops, which splits it into its separate colours."),
    ("What is photosynthesis?",
     "It is how plants turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("How many bones are in an adult human body?", "An adult skeleton has 206 bones."),
    ("Why does ice float on water?",
     "Water expands when it freezes, so ice is less dense than the liquid around it."),
    ("What is the largest planet in the solar system?",
     "Jupiter is the largest, more than eleven times wider than Earth."),
    ("How long does sunlight take to reach us?",
     "It takes about eight minutes and twenty seconds."),
    ("What is the difference between weather and climate?",
     "Weather is what happens from day to day, while climate is the average over many years."),
    ("How do vaccines work?",
     "They train the immune system to recognise a germ without causing the disease."),
    ("Why do we have leap years?",
     "A year lasts about 365 and a quarter days, so an extra day every four years keeps the "
     "calendar in step."),
    ("What is the longest river in the world?",
     "The Nile and the Amazon are both roughly 6,500 kilometres long, and experts still argue "
     "about which is longer."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("How many continents are there?",
     "Most people count seven: Africa, Antarctica, Asia, Australia, Europe, North America and "
     "South America."),
    ("What is the smallest country in the world?",
     "Vatican City, which covers less than half a square kilometre."),
    ("Which ocean is the largest?",
     "The Pacific Ocean, which covers about a third of the planet's surface."),
    ("What is the Sahara?",
     "It is the largest hot desert in the world, stretching across northern Africa."),
    ("Why is the Dead Sea so salty?",
     "Water flows in but can only leave by evaporating, so the salt stays behind."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted it in the early sixteenth century."),
    ("When did people first walk on the Moon?",
     "Neil Armstrong and Buzz Aldrin landed there in the summer of 1969."),
    ("What was the Silk Road?",
     "It was a network of trade routes that linked China with the Mediterranean for centuries."),
    ("Who invented the printing press?",
     "Johannes Gutenberg built the first European movable-type press in the fifteenth century."),
    ("Why did the Titanic sink?",
     "It struck an iceberg in 1912, and too many of its compartments flooded."),
    ("What were the pyramids of Giza built for?",
     "They were built as tombs for the pharaohs of ancient Egypt."),
    ("How do I make my passwords stronger?",
     "Use long passphrases, a different one for every site, and a password manager to keep "
     "track of them."),
    ("How can I stop procrastinating?",
     "Break the task into a tiny first step and commit to working on it for just five minutes."),
    ("How do I get a stain out of a shirt?",
     "Blot it quickly, rinse it from the back with cold water, and rub in a little soap before "
     "washing."),
    ("How often should I water a lawn?",
     "Water it deeply once or twice a week rather than a little every day."),
    ("What is a good way to remember a list?",
     "Picture each item in a different room of a familiar house and walk through it in your mind."),
    ("How can I make a presentation less boring?",
     "Tell a short story, put fewer words on each slide, and ask the audience a question early "
     "on."),
    ("How do I fix a squeaky door?",
     "Put a few drops of oil on the hinges and swing the door back and forth a few times."),
    ("How can I reduce my screen time?",
     "Turn off notifications you do not need and keep your phone out of the bedroom."),
    ("What is compound interest?",
     "It is interest earned both on your savings and on the interest they have already earned."),
    ("How do I make a budget?",
     "List your income, subtract your fixed costs, and give every remaining amount a purpose such "
     "as savings or groceries."),
    ("How can I prepare for an interview?",
     "Research the company, practise common answers out loud, and bring a few questions of your "
     "own."),
    ("What is the Pythagorean theorem?",
     "In a right triangle, the square of the longest side equals the sum of the squares of the "
     "other two."),
    ("What is a prime number?",
     "It is a whole number greater than one that divides evenly only by one and itself."),
    ("How many minutes are there in a day?", "A day has 1,440 minutes."),
    ("What is the speed of sound?",
     "In air at room temperature it travels at about 343 metres per second."),
    ("How do I convert Celsius to Fahrenheit?",
     "Multiply by nine, divide by five and add thirty-two."),
    ("What does a haiku look like?",
     "It is a short poem of three lines with five, seven and five syllables."),
    ("Who wrote Romeo and Juliet?",
     "William Shakespeare wrote it in the last decade of the 1500s."),
    ("What is the difference between a simile and a metaphor?",
     "A simile compares two things using like or as, while a metaphor says one thing is another."),
    ("What is an idiom?",
     "It is a phrase whose meaning differs from its literal words, such as break a leg."),
    ("Why do we yawn?",
     "Nobody is completely sure, but it seems to help cool the brain and it is very contagious."),
    ("Why do onions make people cry?",
     "Cutting them releases a gas that irritates the eyes and makes them water."),
    ("Why does bread go stale?",
     "Its starch slowly recrystallises and the loaf loses moisture as it sits."),
    ("How do noise-cancelling headphones work?",
     "They record the outside sound and play the opposite wave to cancel it out."),
    ("How does a microwave oven heat food?",
     "It makes the water molecules in the food vibrate, and that movement produces heat."),
    ("What is a black hole?",
     "It is a region of space where gravity is so strong that not even light can escape."),
    ("How do magnets work?",
     "The tiny magnetic fields of their electrons line up and add together into one strong field."),
    ("Why is the sea salty?",
     "Rivers carry dissolved minerals from rocks into the sea, where they build up over time."),
    ("What is the tallest building in the world?",
     "The Burj Khalifa in Dubai, which is about 828 metres tall."),
    ("How do aeroplanes stay in the air?",
     "Their wings are shaped so that the air flowing over them creates lift that balances the "
     "plane's weight."),
    ("What is the Great Barrier Reef?",
     "It is the largest reef system in the world, off the coast of Queensland in Australia."),
    ("Why do stars twinkle?",
     "Their light is bent back and forth by moving layers of air in our atmosphere."),
    ("What are tides?",
     "They are the regular rise and fall of the sea, caused mainly by the pull of the Moon."),
    ("How do volcanoes form?",
     "Molten rock rises through cracks in the crust and builds up layers each time it erupts."),
    ("What is the fastest land animal?",
     "The cheetah, which can briefly reach about 110 kilometres per hour."),
    ("How long do elephants live?", "In the wild they often live for sixty to seventy years."),
    ("Why do birds migrate?",
     "They travel to places with more food and milder weather for raising their young."),
    ("How do fish breathe underwater?",
     "Their gills take oxygen out of the water as it flows over them."),
    ("What is the largest animal that has ever lived?",
     "The blue whale, which can grow to about 30 metres long."),
    ("How do chameleons change colour?",
     "Special skin cells rearrange tiny crystals that reflect light in different ways."),
    ("How can I keep a conversation going?",
     "Ask open questions and follow up on the details the other person mentions."),
    ("How do I write a good thank-you note?",
     "Name the gift or favour, say what it meant to you, and keep it warm and short."),
    ("What is a good way to start keeping a diary?",
     "Write three sentences each evening about what happened and how you felt."),
    ("How can I be on time more often?",
     "Plan to arrive ten minutes early and set a reminder for when to leave, not when to arrive."),
    ("What is the metric system?",
     "It is a decimal system of measurement based on metres, grams and litres."),
    ("How does recycling paper help?",
     "It saves trees, water and energy compared with making paper from fresh wood pulp."),
    ("Why do we get goosebumps?",
     "Tiny muscles pull our hairs upright when we are cold or feel a strong emotion."),
    ("How does a bicycle stay upright?",
     "The spinning wheels and small steering corrections keep it balanced while it moves."),
    ("What is inflation?",
     "It is the general rise in prices over time, so the same money buys a little less each year."),
    ("How do clouds form?",
     "Warm, moist air rises and cools, and its water vapour condenses into tiny droplets."),
    ("What is the difference between a virus and a bacterium?",
     "Bacteria are living cells that can multiply on their own, while viruses need a host cell to "
     "copy themselves."),
    ("How does a compass work?",
     "Its magnetised needle lines up with Earth's magnetic field and points roughly north."),
)


def check_material() -> list[str]:
    """Problems with the material (empty when fine): sizes, collisions, values in filler."""
    problems: list[str] = []
    if len(SLOTS) < 10:
        problems.append(f"only {len(SLOTS)} slots")
    if len({s.key for s in SLOTS}) != len(SLOTS):
        problems.append("duplicate slot keys")
    if len(set(RELATIONS)) != len(RELATIONS):
        problems.append("duplicate relations")
    questions = [q for q, _ in FILLER]
    if len(FILLER) < 60 or len(set(questions)) != len(questions):
        problems.append(f"filler: {len(FILLER)} pairs, {len(set(questions))} distinct questions")
    all_values: dict[str, str] = {}
    for s in SLOTS:
        if len(s.values) < 15 or len({v.lower() for v in s.values}) != len(s.values):
            problems.append(f"{s.key}: needs 15+ distinct values")
        if len(s.user) < 2 or len(s.other) < 2 or len(s.questions) < 3:
            problems.append(f"{s.key}: too few wordings")
        if s.answer_template.count("{v}") != 1:
            problems.append(f"{s.key}: answer template needs exactly one {{v}}")
        if any("{rel}" not in t for t in s.other) or any("{rel}" in t for t in s.user + s.past):
            problems.append(f"{s.key}: {{rel}} misplaced")
        for v in s.values:
            if v.lower() in all_values:
                problems.append(f"value {v!r} in both {all_values[v.lower()]} and {s.key}")
            all_values[v.lower()] = s.key
        if " a {v}" in " ".join(s.user + s.other + s.past + (s.answer_template,)):
            problems += [f"{s.key}: 'a {v}'" for v in s.values if v[0].lower() in "aeiou"]
    fixed_text = [ACK, ACK_UPDATE, CORRECTION_PREFIX, *RELATIONS, *questions]
    fixed_text += [a for _, a in FILLER]
    for s in SLOTS:
        fixed_text += [*s.user, *s.other, *s.past, *s.questions, s.answer_template]
    for value, key in all_values.items():
        for text in fixed_text:
            # Substring, not only whole words: recall.py counts a candidate as "in the
            # conversation" by substring.
            if value in text.lower():
                problems.append(f"{key} value {value!r} occurs in {text!r}")
        for other in all_values:
            if other != value and value in other:
                problems.append(f"value {value!r} is part of {other!r}")
    return problems


def _slot_order(seed: int, n: int) -> list[Slot]:
    """Which slot each case asks about: shuffled rounds over all slots, so they stay balanced."""
    rng = random.Random(f"gen_hard:{seed}:order")
    order: list[Slot] = []
    while len(order) < n:
        rnd = list(SLOTS)
        rng.shuffle(rnd)
        order += rnd
    return order[:n]


def _filler(seed: int, i: int, n: int) -> list[tuple[str, str]]:
    """``n`` filler pairs; no repeats until the pool is used up, then another shuffled pass."""
    rng = random.Random(f"gen_hard:{seed}:{i}:filler")
    out: list[tuple[str, str]] = []
    while len(out) < n:
        rnd = list(FILLER)
        rng.shuffle(rnd)
        if out and rnd[0] == out[-1]:  # no identical turns back to back across passes
            rnd[0], rnd[-1] = rnd[-1], rnd[0]
        out += rnd
    return out[:n]


def build_case(
    i: int,
    *,
    seed: int,
    filler: int,
    slot: Slot,
    update: bool,
    facts: int,
    others: int,
    echo_rate: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One case and its metadata (slot, old value, echo) for tests; the case is the JSONL row."""
    rng = random.Random(f"gen_hard:{seed}:{i}")
    used: set[str] = set()

    def draw(s: Slot) -> str:
        v = rng.choice([v for v in s.values if v.lower() not in used])
        used.add(v.lower())
        return v

    rest = [s for s in SLOTS if s is not slot]
    user_slots = [slot] + rng.sample(rest, facts - 1)
    user_vals = {s.key: draw(s) for s in user_slots}
    statements = [rng.choice(s.user).format(v=user_vals[s.key]) for s in user_slots]

    # Other facts: round-robin over the user's slots, the asked slot first.
    rr = [slot] + rng.sample(user_slots[1:], len(user_slots) - 1)
    free_relations = list(RELATIONS)
    other_vals: list[str] = []  # of the asked slot, about other people
    past_vals: list[str] = []  # of the asked slot, the user's past
    past_done: set[str] = set()
    for j in range(others):
        s = rr[j % len(rr)]
        v = draw(s)
        if s.past and s.key not in past_done and rng.random() < PAST_RATE:
            past_done.add(s.key)
            statements.append(rng.choice(s.past).format(v=v))
            if s is slot:
                past_vals.append(v)
        else:
            fits = [r for r in free_relations if s.family_ok or r not in FAMILY]
            rel = rng.choice(fits or free_relations)
            free_relations.remove(rel)
            statements.append(rng.choice(s.other).format(v=v, rel=rel))
            if s is slot:
                other_vals.append(v)
    rng.shuffle(statements)

    old = user_vals[slot.key]
    answer, echo, correction = old, False, None
    if update:
        if other_vals and rng.random() < echo_rate:
            answer, echo = rng.choice(other_vals), True
        else:
            answer = draw(slot)
        text = rng.choice(slot.user).format(v=answer)
        if not re.match(r"I\b", text):  # "Quick correction: the language I'm studying is ..."
            text = text[0].lower() + text[1:]
        correction = CORRECTION_PREFIX + text
    question = rng.choice(slot.questions)
    pos_frac = rng.uniform(*CORRECTION_SPAN)

    # Candidates: answer, then the superseded value and the other values seen in the conversation,
    # then random values of the slot; the distractors in random order.
    seen = [v for v in dict.fromkeys(other_vals + past_vals) if v not in (answer, old)]
    distractors = ([old] if update else []) + rng.sample(seen, len(seen))
    distractors = distractors[:N_DISTRACTORS]
    pool = [v for v in slot.values if v != answer and v not in distractors]
    distractors += rng.sample(pool, N_DISTRACTORS - len(distractors))
    rng.shuffle(distractors)

    messages: list[dict[str, str]] = []
    for text in statements:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": ACK}]
    turns = _filler(seed, i, filler)
    at = round(pos_frac * filler)
    for k in range(filler + 1):
        if correction is not None and k == at:
            messages += [
                {"role": "user", "content": correction},
                {"role": "assistant", "content": ACK_UPDATE},
            ]
        if k < filler:
            q, a = turns[k]
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})

    case = {
        "id": f"gh-s{seed}-f{filler}-{i}",
        "kind": "update" if update else "recall",
        "messages": messages,
        "answer": answer,
        "candidates": [answer, *distractors],
        "answer_template": slot.answer_template,
    }
    meta = {"slot": slot.key, "old": old if update else None, "echo": echo,
            "other_values": other_vals, "past_values": past_vals}
    return case, meta


def generate_with_meta(
    cases: int = 60,
    filler: int = 16,
    seed: int = 0,
    update_every: int = 4,
    facts: int = 4,
    others: int = 4,
    echo_rate: float = 0.15,
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``cases`` (case, metadata) pairs; every ``update_every``-th case (1-based) is an update."""
    if not 1 <= facts <= len(SLOTS):
        raise ValueError(f"facts must be in 1..{len(SLOTS)}")
    if not 0 <= others <= len(RELATIONS):
        raise ValueError(f"others must be in 0..{len(RELATIONS)}")
    if cases < 0 or filler < 0 or update_every < 0:
        raise ValueError("cases, filler and update_every must not be negative")
    order = _slot_order(seed, cases)
    return [
        build_case(
            i,
            seed=seed,
            filler=filler,
            slot=order[i],
            update=update_every > 0 and i % update_every == update_every - 1,
            facts=facts,
            others=others,
            echo_rate=echo_rate,
        )
        for i in range(cases)
    ]


def generate(**kwargs: Any) -> list[dict[str, Any]]:
    """The cases only (see ``generate_with_meta`` for the arguments)."""
    return [case for case, _ in generate_with_meta(**kwargs)]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: writes JSONL to ``-o`` or stdout."""
    ap = argparse.ArgumentParser(prog="gen_hard", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--filler", type=int, default=16, help="filler Q/A turns per case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--update-every", type=int, default=4, help="every Nth case corrects the "
                    "asked fact (0: never)")
    ap.add_argument("--facts", type=int, default=4, help="facts about the user")
    ap.add_argument("--others", type=int, default=4, help="facts about other people")
    ap.add_argument("--echo-rate", type=float, default=0.15, help="chance that a corrected value "
                    "equals another person's value of the slot")
    ap.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    args = ap.parse_args(argv)
    try:
        rows = generate(cases=args.cases, filler=args.filler, seed=args.seed,
                        update_every=args.update_every, facts=args.facts, others=args.others,
                        echo_rate=args.echo_rate)
    except ValueError as e:
        ap.error(str(e))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
