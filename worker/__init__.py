"""mriq worker: Celery app and tasks that call core and record through scheduler."""
