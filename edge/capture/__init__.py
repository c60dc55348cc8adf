"""edge/capture"""
