"""A user reward module for the import-path test."""


def shorter_is_better(completion, reference):
    return -len(completion) / 100.0
