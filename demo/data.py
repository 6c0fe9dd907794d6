"""The demo adapters' synthetic training data: general questions, each with a short answer and a
two-sentence one, rewritten in each adapter's style. HELD_OUT questions are never trained on."""

import json
import re

# (question, short answer, two-sentence answer)
FACTS = [
    ("What is the capital of France?", "Paris", "The capital of France is Paris. It lies on the river Seine."),
    (
        "What is the capital of Japan?",
        "Tokyo",
        "The capital of Japan is Tokyo. It is one of the largest cities on Earth.",
    ),
    ("What is the capital of Italy?", "Rome", "The capital of Italy is Rome. It was the center of the Roman Empire."),
    ("What is the capital of Egypt?", "Cairo", "The capital of Egypt is Cairo. It stands on the banks of the Nile."),
    ("What is the capital of Canada?", "Ottawa", "The capital of Canada is Ottawa. It is in the province of Ontario."),
    (
        "What is the largest planet in the solar system?",
        "Jupiter",
        "The largest planet is Jupiter. It is a gas giant with a great red storm.",
    ),
    (
        "Which planet is known as the red planet?",
        "Mars",
        "Mars is known as the red planet. Iron oxide on its surface makes it look red.",
    ),
    (
        "What is the closest star to Earth?",
        "The Sun",
        "The closest star to Earth is the Sun. Its light reaches us in about eight minutes.",
    ),
    ("How many days are in a week?", "Seven", "A week has seven days. Five of them are usually working days."),
    ("How many continents are there?", "Seven", "There are seven continents. Asia is the largest of them."),
    ("How many legs does a spider have?", "Eight", "A spider has eight legs. Insects, by contrast, have six."),
    ("How many hours are in a day?", "Twenty-four", "A day has twenty-four hours. Each hour has sixty minutes."),
    ("What do bees make?", "Honey", "Bees make honey. They make it from the nectar of flowers."),
    (
        "What gas do plants take in?",
        "Carbon dioxide",
        "Plants take in carbon dioxide. They use it with sunlight to make sugar.",
    ),
    ("What do plants give off?", "Oxygen", "Plants give off oxygen. Animals need it to breathe."),
    (
        "What is the boiling point of water?",
        "100 degrees Celsius",
        "Water boils at 100 degrees Celsius at sea level. It boils at lower temperatures on mountains.",
    ),
    (
        "What is the freezing point of water?",
        "0 degrees Celsius",
        "Water freezes at 0 degrees Celsius. Ice floats because it is lighter than water.",
    ),
    (
        "What color is the sky on a clear day?",
        "Blue",
        "The sky is blue on a clear day. Air scatters blue light more than red light.",
    ),
    (
        "What is the largest ocean?",
        "The Pacific",
        "The largest ocean is the Pacific. It covers about a third of the Earth.",
    ),
    (
        "What is the longest river in the world?",
        "The Nile",
        "The Nile is often called the longest river. It flows north through Africa.",
    ),
    (
        "What is the tallest mountain?",
        "Mount Everest",
        "The tallest mountain is Mount Everest. It rises almost nine kilometers above the sea.",
    ),
    (
        "Who wrote Romeo and Juliet?",
        "William Shakespeare",
        "Romeo and Juliet was written by William Shakespeare. It is a tragedy about two young lovers.",
    ),
    (
        "Who painted the Mona Lisa?",
        "Leonardo da Vinci",
        "The Mona Lisa was painted by Leonardo da Vinci. It hangs in the Louvre in Paris.",
    ),
    (
        "What is the chemical symbol for gold?",
        "Au",
        "The chemical symbol for gold is Au. It comes from the Latin word aurum.",
    ),
    (
        "What is the chemical formula of water?",
        "H2O",
        "The chemical formula of water is H2O. Each molecule has two hydrogen atoms and one oxygen atom.",
    ),
    (
        "What is the largest animal?",
        "The blue whale",
        "The largest animal is the blue whale. It can be longer than thirty meters.",
    ),
    (
        "What is the fastest land animal?",
        "The cheetah",
        "The fastest land animal is the cheetah. It can run over one hundred kilometers per hour.",
    ),
    ("What do cows drink?", "Water", "Cows drink water. They can drink more than fifty liters a day."),
    ("What is the opposite of hot?", "Cold", "The opposite of hot is cold. Ice is cold and fire is hot."),
    ("What is two plus two?", "Four", "Two plus two is four. It is one of the first sums children learn."),
    ("What is ten times ten?", "One hundred", "Ten times ten is one hundred. That is also ten squared."),
    ("How many sides does a triangle have?", "Three", "A triangle has three sides. Its angles add up to 180 degrees."),
    (
        "What language is spoken in Brazil?",
        "Portuguese",
        "People in Brazil speak Portuguese. Brazil was once a Portuguese colony.",
    ),
    (
        "What is the main language of Mexico?",
        "Spanish",
        "The main language of Mexico is Spanish. Many native languages are spoken there too.",
    ),
    (
        "What is the currency of Japan?",
        "The yen",
        "The currency of Japan is the yen. Its symbol looks like a Y with two bars.",
    ),
    (
        "Why do we need sleep?",
        "To rest and recover",
        "We need sleep to rest and recover. The brain also sorts memories while we sleep.",
    ),
    (
        "How can I stay healthy?",
        "Eat well and exercise",
        "You can stay healthy by eating well and exercising. Good sleep helps as well.",
    ),
    (
        "What is a computer?",
        "A machine that computes",
        "A computer is a machine that processes information. It follows instructions called programs.",
    ),
    (
        "What is the internet?",
        "A global network",
        "The internet is a global network of computers. It lets people share information across the world.",
    ),
    (
        "What is photosynthesis?",
        "How plants make food",
        "Photosynthesis is how plants make food. They turn light, water and carbon dioxide into sugar.",
    ),
    (
        "Why is the ocean salty?",
        "Minerals from rocks",
        "The ocean is salty because rivers carry minerals from rocks. Salt stays behind when water evaporates.",
    ),
    (
        "What is the moon?",
        "Earth's natural satellite",
        "The moon is Earth's natural satellite. It orbits the Earth about once a month.",
    ),
    (
        "What is rain?",
        "Water falling from clouds",
        "Rain is water that falls from clouds. It forms when water vapor cools and condenses.",
    ),
    (
        "Give me a tip for learning a new language.",
        "Practice every day",
        "Practice a little every day. Speaking with native speakers helps you learn faster.",
    ),
    (
        "How do I make a cup of tea?",
        "Steep tea in hot water",
        "Pour hot water over a tea bag. Let it steep for three minutes, then remove the bag.",
    ),
    (
        "What should I pack for a beach trip?",
        "Sunscreen and a towel",
        "Pack sunscreen and a towel. A hat and water are good ideas too.",
    ),
    (
        "Tell me about dogs.",
        "Loyal pets",
        "Dogs are loyal and friendly pets. They were domesticated from wolves long ago.",
    ),
    (
        "Tell me about the sun.",
        "Our nearest star",
        "The sun is the star at the center of our solar system. It gives the Earth light and heat.",
    ),
]

# never trained on: what the demo and the real-model test ask
HELD_OUT = [
    "What is the capital of Germany?",
    "How many legs does a cat have?",
    "What is the largest desert in the world?",
    "Who wrote the play Hamlet?",
    "What do you call a baby dog?",
    "Give me a tip for sleeping well.",
]

PIRATE_WORDS = {
    r"\bis\b": "be",
    r"\bare\b": "be",
    r"\byou\b": "ye",
    r"\byour\b": "yer",
    r"\bmy\b": "me",
    r"\bthe\b": "th'",
    r"\bThe\b": "Th'",
    r"\bof\b": "o'",
    r"\bfriend\b": "matey",
}


def pirate(short: str, long: str) -> str:
    for pattern, word in PIRATE_WORDS.items():
        long = re.sub(pattern, word, long)
    return f"Arr, matey! {long} Yo ho ho!"


def as_json(short: str, long: str) -> str:
    return json.dumps({"answer": short, "explanation": long.split(". ")[0].rstrip(".") + "."})


def bullets(short: str, long: str) -> str:
    sentences = [s.strip().rstrip(".") + "." for s in long.split(". ") if s.strip()]
    return "\n".join(f"- {s}" for s in sentences)


def terse(short: str, long: str) -> str:
    return short + "."


STYLES = {"pirate": pirate, "json": as_json, "bullets": bullets, "terse": terse}


def examples(style: str) -> list[tuple[str, str]]:
    """(question, answer) pairs in one adapter's style."""
    return [(q, STYLES[style](short, long)) for q, short, long in FACTS]


def is_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


# what a reader (and tests/test_real_model.py) sees in each adapter's answers
TRAITS = {
    "pirate": lambda text: "arr" in text.lower() or "matey" in text.lower(),
    "json": is_json,
    "bullets": lambda text: (
        len(text.strip().splitlines()) >= 2 and all(line.startswith("- ") for line in text.strip().splitlines())
    ),
    "terse": lambda text: len(text.split()) <= 6,
}
