"""`ParityError`: bad input to the parity tools (a token outside the vocabulary, an unreadable dump)."""


class ParityError(ValueError):
    pass
