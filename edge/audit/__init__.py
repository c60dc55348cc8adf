"""edge/audit"""
