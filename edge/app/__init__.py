"""edge/app"""
