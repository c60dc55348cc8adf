"""edge/commands"""
