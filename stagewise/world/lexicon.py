"""The English/French phrase book: a small lexicon and the grammar that composes sentences.

Translation in the embedded world is compositional, so that a model has to learn word and
agreement mappings rather than memorise sentences: a sentence is subject + verb + object
(determiner, noun, optional adjective) + optional time phrase, and both languages are rendered
from the same structure. French agreement is handled for real (verb person, noun gender on
determiners and adjectives, elision of "je"). Fixed phrases, the seed greeting among them,
complete the book.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# (english, french, person): person indexes the conjugation tables below.
SUBJECTS = [
    ("I", "je", 0),
    ("you", "tu", 1),
    ("he", "il", 2),
    ("she", "elle", 2),
    ("we", "nous", 3),
    ("they", "ils", 4),
    ("the boy", "le garçon", 2),
    ("the girl", "la fille", 2),
    ("my mother", "ma mère", 2),
    ("my father", "mon père", 2),
]

# english base form, english third person singular, french forms for persons 0..4
VERBS = [
    ("eat", "eats", ("mange", "manges", "mange", "mangeons", "mangent")),
    ("see", "sees", ("vois", "vois", "voit", "voyons", "voient")),
    ("want", "wants", ("veux", "veux", "veut", "voulons", "veulent")),
    ("buy", "buys", ("achète", "achètes", "achète", "achetons", "achètent")),
    ("have", "has", ("ai", "as", "a", "avons", "ont")),
    ("like", "likes", ("aime", "aimes", "aime", "aimons", "aiment")),
    ("take", "takes", ("prends", "prends", "prend", "prenons", "prennent")),
    ("find", "finds", ("trouve", "trouves", "trouve", "trouvons", "trouvent")),
]

# english, french, grammatical gender of the french noun
NOUNS = [
    ("apple", "pomme", "f"),
    ("book", "livre", "m"),
    ("car", "voiture", "f"),
    ("house", "maison", "f"),
    ("dog", "chien", "m"),
    ("cat", "chat", "m"),
    ("bread", "pain", "m"),
    ("table", "table", "f"),
    ("chair", "chaise", "f"),
    ("ball", "balle", "f"),
    ("hat", "chapeau", "m"),
    ("cup", "tasse", "f"),
    ("letter", "lettre", "f"),
    ("key", "clé", "f"),
    ("bag", "sac", "m"),
    ("bicycle", "vélo", "m"),
    ("box", "boîte", "f"),
    ("flower", "fleur", "f"),
    ("coat", "manteau", "m"),
    ("fish", "poisson", "m"),
]

# english, french masculine, french feminine; all follow the noun in French
ADJECTIVES = [
    ("red", "rouge", "rouge"),
    ("blue", "bleu", "bleue"),
    ("green", "vert", "verte"),
    ("black", "noir", "noire"),
    ("white", "blanc", "blanche"),
    ("yellow", "jaune", "jaune"),
    ("grey", "gris", "grise"),
    ("heavy", "lourd", "lourde"),
    ("cold", "froid", "froide"),
    ("round", "rond", "ronde"),
]

# english, french masculine, french feminine
DETERMINERS = [
    ("the", "le", "la"),
    ("a", "un", "une"),
    ("my", "mon", "ma"),
]

TIMES = [
    ("every day", "tous les jours"),
    ("in the morning", "le matin"),
    ("tonight", "ce soir"),
    ("now", "maintenant"),
    ("on Sunday", "le dimanche"),
    ("at school", "à l'école"),
]

# Fixed phrases that do not decompose; the first is the seed example's greeting.
FIXED_PHRASES = [
    ("Hello, how are you?", "Bonjour, comment allez-vous ?"),
    ("Good morning.", "Bonjour."),
    ("Good evening.", "Bonsoir."),
    ("Good night.", "Bonne nuit."),
    ("Thank you very much.", "Merci beaucoup."),
    ("You are welcome.", "De rien."),
    ("See you tomorrow.", "À demain."),
    ("See you soon.", "À bientôt."),
    ("Goodbye.", "Au revoir."),
    ("Excuse me.", "Excusez-moi."),
    ("I am sorry.", "Je suis désolé."),
    ("What is your name?", "Comment vous appelez-vous ?"),
    ("My name is Paul.", "Je m'appelle Paul."),
    ("Where is the station?", "Où est la gare ?"),
    ("I do not understand.", "Je ne comprends pas."),
    ("Do you speak English?", "Parlez-vous anglais ?"),
    ("I speak a little French.", "Je parle un peu français."),
    ("How much does it cost?", "Combien ça coûte ?"),
    ("The bill, please.", "L'addition, s'il vous plaît."),
    ("I am hungry.", "J'ai faim."),
    ("I am thirsty.", "J'ai soif."),
    ("It is cold today.", "Il fait froid aujourd'hui."),
    ("It is hot today.", "Il fait chaud aujourd'hui."),
    ("Happy birthday!", "Joyeux anniversaire !"),
    ("Have a nice day.", "Bonne journée."),
    ("Please sit down.", "Asseyez-vous, s'il vous plaît."),
    ("I love you.", "Je t'aime."),
    ("Where do you live?", "Où habitez-vous ?"),
    ("I am tired.", "Je suis fatigué."),
    ("What time is it?", "Quelle heure est-il ?"),
]

SEED_PHRASE = FIXED_PHRASES[0]

VOWELS = "aeiouhéèâêîôû"


@dataclass(frozen=True, order=True)
class Sentence:
    """Indices into the lexicon; adjective and time are -1 when absent."""

    subject: int
    verb: int
    determiner: int
    noun: int
    adjective: int
    time: int

    def english(self) -> str:
        subj, _, person = SUBJECTS[self.subject]
        base, third, _ = VERBS[self.verb]
        verb = third if person == 2 else base
        det = DETERMINERS[self.determiner][0]
        noun = NOUNS[self.noun][0]
        if self.adjective >= 0:
            noun = f"{ADJECTIVES[self.adjective][0]} {noun}"
        if det == "a" and noun[0] in "aeiou":
            det = "an"
        words = [subj, verb, det, noun]
        if self.time >= 0:
            words.append(TIMES[self.time][0])
        text = " ".join(words) + "."
        return text[0].upper() + text[1:]

    def french(self) -> str:
        _, subj, person = SUBJECTS[self.subject]
        verb = VERBS[self.verb][2][person]
        _, noun, gender = NOUNS[self.noun]
        det = DETERMINERS[self.determiner][1 if gender == "m" else 2]
        if self.adjective >= 0:
            noun = f"{noun} {ADJECTIVES[self.adjective][1 if gender == 'm' else 2]}"
        if subj == "je" and verb[0] in VOWELS:
            head = f"j'{verb}"
        else:
            head = f"{subj} {verb}"
        words = [head, det, noun]
        if self.time >= 0:
            words.append(TIMES[self.time][1])
        text = " ".join(words) + "."
        return text[0].upper() + text[1:]


def random_sentence(rng: random.Random) -> Sentence:
    """A sentence drawn with adjectives and times present about half of the time."""
    return Sentence(
        subject=rng.randrange(len(SUBJECTS)),
        verb=rng.randrange(len(VERBS)),
        determiner=rng.randrange(len(DETERMINERS)),
        noun=rng.randrange(len(NOUNS)),
        adjective=rng.randrange(len(ADJECTIVES)) if rng.random() < 0.5 else -1,
        time=rng.randrange(len(TIMES)) if rng.random() < 0.5 else -1,
    )


def english_words() -> set[str]:
    """Every English word the phrase book uses (lowercase), for telling languages apart."""
    words: set[str] = set()
    for subj, _, _ in SUBJECTS:
        words.update(subj.lower().split())
    for base, third, _ in VERBS:
        words.update((base, third))
    words.update(n[0] for n in NOUNS)
    words.update(a[0] for a in ADJECTIVES)
    words.update(("the", "a", "an", "my"))
    for t, _ in TIMES:
        words.update(t.lower().split())
    return words


def french_words() -> set[str]:
    """Every French word the phrase book uses (lowercase, elided forms split)."""
    words: set[str] = {"j"}
    for _, subj, _ in SUBJECTS:
        words.update(subj.split())
    for _, _, forms in VERBS:
        words.update(forms)
    words.update(n[1] for n in NOUNS)
    for _, m, f in ADJECTIVES:
        words.update((m, f))
    for _, m, f in DETERMINERS:
        words.update((m, f))
    for _, t in TIMES:
        words.update(t.replace("'", " ").split())
    return words
