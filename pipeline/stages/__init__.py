"""The stages a row passes: read -> chunk -> batch -> infer -> decode -> merge -> write.

Each module is one arrow of the data flow (see pipeline/__init__.py). Stages know nothing of
jobs, processes, work directories or Ray: they may import the shared ground and models/, never
engines/ or quality/.
"""
