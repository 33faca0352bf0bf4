"""The LARP tokenizer: config + model (`tokenizer`), its building blocks (`layers`, `quantizer`, `prior`), and
checkpoint folders, ours and the reference's (`checkpoint`)."""
