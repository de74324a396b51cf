"""The execution room: running a training function on a Ray worker group, on the driver.

``trainer`` (the attempts of a run) asks ``failure_policy`` what to do and drives
``controller`` (one attempt), which reads the workers (``poll``), pairs their reports
(``iterations``), runs the callbacks (``dispatch``) and turns errors into one
(``worker_errors``). ``worker_group`` and ``worker`` are the actors, ``cluster`` the Ray
connection and capacity, ``backend_setup`` the one caller of backend hooks, ``preflight`` the
storage checks, ``pickling`` how functions travel, ``history`` what was reported.
"""
