"""Write the four "ordinary user data" files of tests/data/ (``python tests/data/make_user_data.py``).

Hand-written English dialogues with capitals, punctuation, digits, ``#``, apostrophes, newlines and a little
non-ASCII text, in the formats people bring: Alpaca rows, chat ``messages``, HH-RLHF transcripts (implicit
preference pairs) and conversational preferences. Multi-turn prompts run from about 50 to 300 tokens of the
tiny model's byte-level tokenizer. The last row of each preference file repeats its answer on both sides (an
identical pair the data module must drop).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (topic, earlier turns as (user, assistant) pairs, final question, good answer, poor answer)
DIALOGUES = [
    ("Baking", [("I'd like to bake bread this weekend. Where should I start?",
                 "Start with a simple white loaf: 500 g flour, 350 ml water, 10 g salt and 7 g yeast.")],
     "My first loaf came out dense. What went wrong?",
     "A dense loaf usually means the dough didn't rise enough. Let it prove somewhere warm until it doubles "
     "(about 1-2 hours), and knead for 10 minutes so the gluten can trap the gas.",
     "Bread is hard. Buy it at a shop."),
    ("Python", [("How do I read a file line by line in Python?",
                 "Use a with-block: `with open(\"notes.txt\") as f:` then `for line in f:`. The file closes itself."),
                ("And if the file is huge, say 4 GB?",
                 "The same loop works: it reads one line at a time, so memory stays small.")],
     "How can I count the lines that start with '#'?",
     "Keep a counter: `n = sum(1 for line in f if line.startswith(\"#\"))`. Lines with leading spaces need "
     "`line.lstrip().startswith(\"#\")` instead.",
     "Python can't do that; you need Perl."),
    ("Travel", [("We're visiting Lisbon in May. Is it warm then?",
                 "Yes: days are usually 20-24 °C, with little rain. Nights are cooler, so bring a light jacket."),
                ("What's a good day trip?",
                 "Sintra is 40 minutes away by train. The Pena Palace and the Moorish Castle are worth it.")],
     "Any tips for eating out? We don't speak Portuguese.",
     "Most restaurants in the centre have English menus. Try a pastel de nata at a café, and note that the bread "
     "and olives put on the table are not free (about €2-3). Saying \"obrigado\" (or \"obrigada\") is appreciated.",
     "Just point at things."),
    ("Finance", [("I earn $3,200 a month. How much should I save?",
                  "A common rule is 50/30/20: 50 % needs, 30 % wants, 20 % savings, so about $640 a month.")],
     "Should I pay off my credit card first or save?",
     "Pay off the credit card first: at 20 % interest or more, every dollar of debt costs more than savings earn. "
     "Keep a small emergency fund (say $1,000) while you do it.",
     "Save first, debts sort themselves out."),
    ("Health", [("I want to start running but I'm out of shape.",
                 "Try a run-walk plan: 1 minute running, 2 minutes walking, repeated 8 times, three days a week."),
                ("My knees hurt after the second week.",
                 "Slow down and check your shoes; sore knees often come from doing too much too soon.")],
     "When can I try a 5 km race?",
     "Most beginners are ready after 8-9 weeks of steady training. Pick a race about 2 months out, and don't "
     "worry about your time: finishing comfortably is the goal.",
     "Tomorrow. Just push through the pain."),
    ("Writing", [("Can you help me write a thank-you note to my teacher, Mrs. O'Brien?",
                  "Of course! Tell me one thing she did that mattered to you.")],
     "She stayed after class every Tuesday to help me with algebra.",
     "Dear Mrs. O'Brien,\nThank you for staying after class every Tuesday to help me with algebra. Your patience "
     "made a difficult subject feel possible, and I'm grateful.\nWarm regards,\nSam",
     "thx for the help"),
    ("Science", [("Why is the sky blue?",
                  "Sunlight scatters off air molecules, and blue light (shorter wavelength) scatters the most: "
                  "Rayleigh scattering."),
                 ("Then why are sunsets red?",
                  "At sunset light crosses much more air, so most of the blue is scattered away before it reaches "
                  "you; the reds and oranges remain.")],
     "Is it the same on Mars?",
     "No: Mars has a thin atmosphere full of fine dust, so its daytime sky looks butterscotch, and its sunsets "
     "look blue, because the dust scatters blue light forward toward the viewer.",
     "Yes, every planet has a blue sky."),
    ("Cooking", [("What's the difference between baking soda and baking powder?",
                  "Baking soda is pure sodium bicarbonate and needs an acid (buttermilk, yoghurt, lemon). Baking "
                  "powder already contains the acid."),
                 ("Can I swap one for the other?",
                  "Roughly: 1 tsp baking powder ≈ 1/4 tsp baking soda plus an acid. Going the other way, use "
                  "about 3 times as much powder.")],
     "My pancakes taste metallic. Why?",
     "Too much baking soda (or powder) that the batter's acid couldn't neutralise. Measure level teaspoons and "
     "check the recipe: 1/2 tsp of soda is plenty for 2 cups of flour.",
     "Your pan is metal."),
]


def chat(turns: list[tuple[str, str]], question: str) -> list[dict[str, str]]:
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": question}]


def transcript(turns: list[tuple[str, str]], question: str) -> str:
    text = "".join(f"\n\nHuman: {user}\n\nAssistant: {assistant}" for user, assistant in turns)
    return text + f"\n\nHuman: {question}\n\nAssistant:"


def alpaca_rows() -> list[dict]:
    rows = []
    for topic, turns, question, good, _ in DIALOGUES:
        context = "\n".join(f"User: {u}\nAssistant: {a}" for u, a in turns)
        rows.append({"instruction": f"{topic}: {question}",
                     "input": context, "output": good})
    return rows


def messages_rows() -> list[dict]:
    return [{"messages": chat(turns, question) + [{"role": "assistant", "content": good}]}
            for _, turns, question, good, _ in DIALOGUES]


def hh_rows() -> list[dict]:
    rows = [{"chosen": transcript(turns, question) + " " + good, "rejected": transcript(turns, question) + " " + poor}
            for _, turns, question, good, poor in DIALOGUES]
    same = transcript(DIALOGUES[0][1], DIALOGUES[0][2]) + " " + DIALOGUES[0][3]
    return rows + [{"chosen": same, "rejected": same}]


def conversational_rows() -> list[dict]:
    rows = [{"prompt": chat(turns, question), "chosen": [{"role": "assistant", "content": good}],
             "rejected": [{"role": "assistant", "content": poor}]}
            for _, turns, question, good, poor in DIALOGUES]
    _, turns, question, good, _ = DIALOGUES[1]
    return rows + [{"prompt": chat(turns, question), "chosen": [{"role": "assistant", "content": good}],
                    "rejected": [{"role": "assistant", "content": good}]}]


FILES = {"alpaca.jsonl": alpaca_rows, "messages.jsonl": messages_rows, "hh_rlhf.jsonl": hh_rows,
         "conversational.jsonl": conversational_rows}

if __name__ == "__main__":
    for name, rows in FILES.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows())
        (HERE / name).write_text(text, encoding="utf-8")
        print(HERE / name)
