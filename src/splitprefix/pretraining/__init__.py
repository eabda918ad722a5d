"""Building the shipped base model: the offline corpus (`corpus`) and the pretraining recipe (`recipe`).

This is the vendor's tool that produced `splitprefix/model/builtin/weights/`; nothing at run time
(serving, training a prefix, federation) needs it.
"""
