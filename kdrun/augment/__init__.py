"""Data augmentation for distillation: extra unlabelled inputs that the teacher labels.

A student distilled on the task's training set alone sees too few inputs to imitate
the teacher's soft outputs well; augmentation (e.g. Tang et al., 2019, in ``tang``)
creates plausible variants of the training sentences so the teacher can be queried on
many more points. Kept free of heavy imports: spaCy is only imported when a tagger is
loaded.
"""
