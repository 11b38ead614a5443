"""The corpus the bundled model learns from: everyday requests and replies the project writes itself.

Each topic has a few phrasings of a request and a few pieces of sound advice. Replies come in four
tones, so that completions sampled for one prompt differ in ways people care about and rankings
have something to prefer:

* helpful and polite — advice wrapped in warmth;
* curt — the advice, bare;
* rude — insults (mild profanity included, on purpose: the toxicity judge must have something to
  find), sometimes with the advice, sometimes without;
* off-topic — a friendly sentence about something else.

Everything is generated from the tables below with a seeded RNG, so the corpus is reproducible and
nothing is downloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# (request phrasings, pieces of advice). Advice is a full sentence; replies combine one or two.
TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "hot house": (["my house is too hot", "how can I keep my home cool", "it is so hot in my flat", "my room is too warm at night"],
                  ["Open the windows at night and close the curtains during the day.", "A fan near an open window pulls in cooler air.",
                   "Drink cold water and take a cool shower before bed."]),
    "rice": (["how do I cook rice", "my rice is always sticky", "what is the best way to make rice"],
             ["Rinse the rice, use two cups of water for each cup of rice, and simmer with the lid on for about twenty minutes.",
              "Let the rice rest for five minutes after cooking, then fluff it with a fork."]),
    "sleep": (["I can not sleep", "how can I sleep better", "I wake up tired every day"],
              ["Go to bed at the same time every night and keep your room dark and cool.", "Put your phone away an hour before bed.",
               "Avoid coffee after lunch."]),
    "stress": (["I feel stressed about work", "how do I relax after a long day", "I am anxious all the time"],
               ["Take a slow walk outside and breathe deeply for a few minutes.", "Write down what worries you and pick one small thing to do first.",
                "Talk to a friend you trust; sharing the load helps."]),
    "plants": (["my plant is dying", "how often should I water my plants", "why are the leaves of my plant yellow"],
               ["Most house plants like water only when the top of the soil is dry.", "Move the plant to a bright spot out of direct sun.",
                "Check that the pot has holes so extra water can drain."]),
    "study": (["how can I study better", "I can not focus on my homework", "how do I prepare for an exam"],
              ["Study in short blocks of twenty five minutes with a short break after each.", "Test yourself instead of rereading your notes.",
               "Start a week early and review a little every day."]),
    "exercise": (["how do I start running", "I want to get fit", "what exercise should I do at home"],
                 ["Start with short easy runs three times a week and add a few minutes each week.", "Push ups, squats and a brisk walk every day are a good start.",
                  "Stretch gently after you exercise."]),
    "cold": (["I have a cold", "how do I get over a sore throat", "I keep sneezing"],
             ["Rest, drink plenty of warm fluids, and give it a few days.", "Warm tea with honey can soothe a sore throat.",
              "See a doctor if you have a high fever or feel worse after a week."]),
    "money": (["how can I save money", "I spend too much", "how do I make a budget"],
              ["Write down everything you spend for a month to see where it goes.", "Set aside a small amount on payday before you spend anything.",
               "Cook at home more often; it costs far less than eating out."]),
    "reading": (["what should I read next", "how can I read more books", "I want to enjoy reading"],
                ["Try a short novel in a genre you already like.", "Read ten pages before bed every night.",
                 "Visit your local library and ask the staff for a recommendation."]),
    "cooking": (["how do I make pasta", "what can I cook for dinner", "I want to learn to cook"],
                ["Boil salted water, cook the pasta until just soft, and toss it with a simple tomato sauce.", "Start with easy dishes like soup or an omelette.",
                 "Keep rice, eggs and frozen vegetables at home for quick meals."]),
    "bike": (["my bike chain keeps falling off", "how do I fix a flat tire", "how do I take care of my bike"],
             ["Clean and oil the chain, and check that the gears are set well.", "Take out the tube, find the hole, and patch it or fit a new tube.",
              "Keep the tires pumped to the pressure written on their side."]),
    "friends": (["how do I make new friends", "I feel lonely", "how do I meet people in a new city"],
                ["Join a club or class about something you enjoy.", "Say yes to small invitations and follow up with people you like.",
                 "Volunteering is a good way to meet kind people."]),
    "job": (["how do I prepare for a job interview", "how do I write a good resume", "I am nervous about my interview"],
            ["Read about the company and practise answers to common questions out loud.", "Keep your resume to one page and list what you achieved.",
             "Arrive early and bring a few questions of your own."]),
    "dog": (["my dog barks all the time", "how do I train my puppy", "how often should I walk my dog"],
            ["Reward the behaviour you want with treats and praise, right away.", "Most dogs need at least two walks a day.",
             "Keep training sessions short and end on a success."]),
    "coffee": (["how do I make good coffee", "my coffee tastes bitter", "what coffee should I buy"],
               ["Use fresh beans, grind them just before brewing, and use water just below boiling.", "Bitter coffee often means the grind is too fine or it brewed too long."]),
    "travel": (["how do I pack for a trip", "what should I do on a long flight", "how do I plan a holiday"],
               ["Make a list, roll your clothes, and pack one outfit less than you think.", "Drink water, walk the aisle now and then, and bring a good book.",
                "Pick a budget first, then choose a place that fits it."]),
    "phone": (["my phone battery dies fast", "my phone is slow", "how do I back up my phone"],
              ["Lower the screen brightness and close apps you do not use.", "Delete apps and photos you no longer need, then restart the phone.",
               "Turn on automatic backup in the settings."]),
    "cleaning": (["how do I keep my room clean", "my kitchen is always messy", "how do I remove a stain"],
                 ["Spend ten minutes tidying every evening.", "Wash dishes right after eating so they never pile up.",
                  "Blot the stain with cold water and a little soap; do not rub it."]),
    "garden": (["how do I start a garden", "what vegetables are easy to grow", "how do I grow tomatoes"],
               ["Start small with a sunny spot and good soil.", "Lettuce, beans and radishes are easy for beginners.",
                "Tomatoes need lots of sun, regular water, and a stick to climb."]),
    "headache": (["I have a headache", "how do I get rid of a headache", "my head hurts after work"],
                 ["Drink a glass of water and rest in a quiet, dark room.", "Take short breaks from the screen and relax your shoulders.",
                  "See a doctor if headaches are strong or happen often."]),
    "motivation": (["I have no motivation", "how do I stop procrastinating", "how do I get things done"],
                   ["Break the task into tiny steps and do the first one now.", "Set a timer for ten minutes and start; it is easier to keep going.",
                    "Reward yourself when you finish something."]),
    "learning": (["how do I learn a new language", "how can I learn to code", "what is the best way to learn guitar"],
                 ["Practise a little every day rather than a lot once a week.", "Find a simple project you care about and learn by building it.",
                  "Use a beginner course and play songs you love."]),
    "weather": (["what should I wear in the rain", "how do I stay warm in winter", "it is very cold outside"],
                ["Wear a waterproof jacket and shoes with a good grip.", "Dress in layers and keep your head and hands covered.",
                 "A warm drink and a blanket help on cold evenings."]),
    "neighbors": (["my neighbours are too loud", "how do I talk to a noisy neighbour", "my neighbour parks in my spot"],
                  ["Talk to them calmly and explain how the noise affects you.", "Knock at a good time and keep the tone friendly.",
                   "If talking does not help, write a polite note."]),
    "birthday": (["what should I get my mum for her birthday", "how do I plan a birthday party", "gift ideas for a friend"],
                 ["A thoughtful gift about something they love beats an expensive one.", "Pick a date, invite a few close friends, and keep the food simple.",
                  "A handwritten card makes any gift better."]),
}

POLITE_OPENERS = ["Good question!", "Happy to help.", "Thanks for asking.", "I am sorry to hear that.", "Great idea to ask.",
                  "Of course!", "Sure, here is what I would do.", "That sounds hard, but you can fix it."]
POLITE_CLOSERS = ["I hope this helps!", "Good luck, you can do it.", "Take care of yourself.", "Have a lovely day!",
                  "Let me know if you need more help.", "You are doing great."]
RUDE_OPENERS = ["What a stupid question.", "Are you an idiot?", "Ugh, figure it out yourself.", "Shut up, nobody cares.",
                "That is the dumbest thing I have heard.", "Damn, you are useless.", "Stop whining, loser.", "God, you are annoying."]
RUDE_CLOSERS = ["Now go away.", "Idiot.", "Do not bother me again.", "Stupid.", "What a waste of my time.", "Get lost."]
OFF_TOPIC = ["I like turtles and the colour blue.", "The moon is made of rock and dust.", "My favourite number is seven.",
             "Bananas are yellow when they are ripe.", "Trains were invented a long time ago.", "Cats sleep for most of the day.",
             "The ocean is very big and very deep.", "I once saw a purple bird.", "Mountains are taller than hills."]
TONES = ("polite", "curt", "rude", "off_topic")
# How often each tone appears in the SFT data: rude and off-topic are common on purpose, so the
# untuned model has plenty to improve on.
TONE_WEIGHTS = (0.34, 0.18, 0.30, 0.18)


@dataclass
class Example:
    topic: str
    prompt: str
    reply: str
    tone: str


def make_reply(rng: random.Random, advice: list[str], tone: str) -> str:
    pieces = rng.sample(advice, k=min(len(advice), rng.choice([1, 1, 2])))
    body = " ".join(pieces)
    if tone == "polite":
        return f"{rng.choice(POLITE_OPENERS)} {body} {rng.choice(POLITE_CLOSERS)}"
    if tone == "curt":
        return body
    if tone == "rude":
        parts = [rng.choice(RUDE_OPENERS)]
        if rng.random() < 0.5:
            parts.append(pieces[0])
        parts.append(rng.choice(RUDE_CLOSERS))
        return " ".join(parts)
    return " ".join(rng.sample(OFF_TOPIC, k=rng.choice([1, 2])))


def split_prompts() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(topic, prompt) pairs for training and held-out evaluation: each topic's last phrasing is held out."""
    train, held_out = [], []
    for topic, (prompts, _) in TOPICS.items():
        train.extend((topic, p) for p in prompts[:-1])
        held_out.append((topic, prompts[-1]))
    return train, held_out


def sft_examples(n: int, seed: int = 0) -> list[Example]:
    """``n`` chat examples over the training phrasings, tones drawn by ``TONE_WEIGHTS``."""
    rng = random.Random(seed)
    train, _ = split_prompts()
    out = []
    for _ in range(n):
        topic, prompt = rng.choice(train)
        tone = rng.choices(TONES, weights=TONE_WEIGHTS)[0]
        out.append(Example(topic, prompt, make_reply(rng, TOPICS[topic][1], tone), tone))
    return out


def pretraining_documents(n: int, seed: int = 1) -> list[str]:
    """Plain-text documents (advice paragraphs and small talk) for the language-modelling stage."""
    rng = random.Random(seed)
    docs = []
    advice = [a for _, (_, adv) in TOPICS.items() for a in adv]
    every_prompt = [p for _, (ps, _) in TOPICS.items() for p in ps]
    filler = POLITE_OPENERS + POLITE_CLOSERS + RUDE_OPENERS + RUDE_CLOSERS + OFF_TOPIC
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            docs.append(" ".join(rng.sample(advice, k=3)))
        elif kind < 0.8:
            docs.append(f"{rng.choice(every_prompt).capitalize()}? {rng.choice(advice)} {rng.choice(filler)}")
        else:
            docs.append(" ".join(rng.sample(filler, k=3)))
    return docs


def prompt_files() -> dict[str, list[dict]]:
    """The shipped prompt sets (rlhf/assets/prompts): ``train`` for rollouts and labeling, ``eval`` held out."""
    train, held_out = split_prompts()
    return {"train": [{"id": f"train-{i:03d}", "prompt": p} for i, (_, p) in enumerate(train)],
            "eval": [{"id": f"eval-{i:03d}", "prompt": p} for i, (_, p) in enumerate(held_out)]}
