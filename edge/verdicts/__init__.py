"""edge/verdicts"""
