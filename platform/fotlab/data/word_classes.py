"""A small labelled classification set for few-shot ICL, made offline: English words and their class.

    python -m fotlab.data.word_classes experiments/paper/data/word_classes.jsonl   # (re)writes the shipped file

Eight classes of 30 common words each (240 examples, one JSON object a line: {"text": word, "label": class}),
sorted by class then word, so the file is a pure function of this module. The few-shot evaluation splits it by
text (`fotlab.data.splits`): queries are the dev / test words, demonstrations the train words, so answering needs
the class, not a copy of a demonstration. Chance is 1/8.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WORDS = {
    "animal": "bear cat cow deer dog donkey duck eagle fox frog goat goose horse lion monkey mouse owl pig "
    "rabbit rat sheep snake spider tiger turtle whale wolf zebra camel crow",
    "colour": "amber beige black blue brown crimson cyan gold green grey indigo ivory khaki lavender lilac "
    "magenta maroon navy olive orange pink purple red scarlet silver tan teal turquoise violet white",
    "fruit": "apple apricot banana cherry coconut date fig grape guava kiwi lemon lime lychee mango melon "
    "nectarine blackberry blueberry papaya peach pear pineapple plum pomegranate quince raisin "
    "raspberry strawberry tangerine watermelon",
    "number": "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
    "hundred thousand million",
    "body": "ankle arm back cheek chest chin ear elbow eye finger foot hand head heart heel hip knee leg lip "
    "lung mouth neck nose shoulder skin stomach thumb toe tongue wrist",
    "weather": "blizzard breeze cloud drizzle drought fog frost gale hail haze heatwave hurricane ice lightning "
    "mist monsoon rain rainbow sleet smog snow storm sunshine thunder tornado typhoon wind humidity "
    "dew gust",
    "tool": "anvil awl axe chisel clamp drill file hammer hoe ladder level mallet pick pliers plane rake saw "
    "scissors screwdriver shovel sickle spade spanner tongs trowel vice wedge wrench crowbar sander",
    "country": "austria brazil canada chile china cuba egypt france germany ghana greece india iran ireland "
    "italy japan kenya mexico nepal norway peru poland portugal russia spain sweden turkey uganda "
    "vietnam yemen",
}


def word_class_examples() -> list[dict[str, str]]:
    """The 240 examples, sorted by (label, text); underscores in a word become spaces."""
    return [
        {"text": w.replace("_", " "), "label": label} for label in sorted(WORDS) for w in sorted(WORDS[label].split())
    ]


def write_jsonl(path: str | Path) -> Path:
    """Write the examples as JSON lines to path; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(ex) + "\n" for ex in word_class_examples()))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m fotlab.data.word_classes OUT.jsonl")
    print(write_jsonl(sys.argv[1]))
