"""Notebooks 00 and 09, the workbench: pipelines (`pipeline`), running them (`runner`), the run ledger
(`ledger`), stage results JSON (`results`), plots (`plots`), widgets (`widgets`) and the environment
report (`environment`)."""
