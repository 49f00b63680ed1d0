"""Plumbing shared by Cairn's services. Business logic lives in the services, never here."""
