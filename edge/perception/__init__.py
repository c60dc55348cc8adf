"""edge/perception"""
