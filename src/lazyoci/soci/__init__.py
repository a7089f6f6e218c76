"""soci"""
