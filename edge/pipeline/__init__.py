"""edge/pipeline"""
