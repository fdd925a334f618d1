"""The phrase-book grammar: hand-checked sentences in both languages."""

from stagewise.world import lexicon
from stagewise.world.lexicon import Sentence


def index(table, english):
    return next(i for i, row in enumerate(table) if row[0] == english)


def sentence(subject, verb, det, noun, adj=None, time=None):
    return Sentence(index(lexicon.SUBJECTS, subject), index(lexicon.VERBS, verb), index(lexicon.DETERMINERS, det),
                    index(lexicon.NOUNS, noun), index(lexicon.ADJECTIVES, adj) if adj else -1,
                    index(lexicon.TIMES, time) if time else -1)


def test_agreement_and_elision():
    s = sentence("I", "eat", "the", "apple", "red")
    assert (s.english(), s.french()) == ("I eat the red apple.", "Je mange la pomme rouge.")
    s = sentence("I", "have", "a", "dog", "white", "every day")
    assert (s.english(), s.french()) == ("I have a white dog every day.", "J'ai un chien blanc tous les jours.")
    s = sentence("she", "have", "my", "bag")
    assert (s.english(), s.french()) == ("She has my bag.", "Elle a mon sac.")
    s = sentence("they", "take", "a", "box", "white", "at school")
    assert (s.english(), s.french()) == ("They take a white box at school.", "Ils prennent une boîte blanche à l'école.")
    s = sentence("we", "see", "a", "apple")
    assert (s.english(), s.french()) == ("We see an apple.", "Nous voyons une pomme.")


def test_seed_phrase_is_in_the_book():
    assert lexicon.SEED_PHRASE == ("Hello, how are you?", "Bonjour, comment allez-vous ?")
    assert lexicon.SEED_PHRASE in lexicon.FIXED_PHRASES
