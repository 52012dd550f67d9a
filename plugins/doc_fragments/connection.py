# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # The connection options of every steep.repl database module
    # (plugins/module_utils/db.py connection_argument_spec(); the inventory contract is docs/inventory.md).
    DOCUMENTATION = r"""
options:
  login_host:
    description:
      - Host name or address of the PostgreSQL server, reached over TCP from the host that runs the task
        (the controller when the task is delegated to C(localhost), as for Windows nodes).
      - Inventory variable C(steep_pg_host).
    type: str
    default: 127.0.0.1
    aliases: [steep_pg_host, host]
  login_port:
    description: PostgreSQL port (C(steep_pg_port)).
    type: int
    default: 5432
    aliases: [steep_pg_port, port]
  login_user:
    description: Superuser to connect as (C(steep_pg_user)).
    type: str
    default: postgres
    aliases: [steep_pg_user, user]
  login_password:
    description:
      - Password of O(login_user) (C(steep_pg_password)); when not given, the C(STEEP_PG_PASSWORD) environment
        variable of the host running the task, then libpq's own sources (C(.pgpass)).
      - Never returned or logged.
    type: str
    aliases: [steep_pg_password, password]
  login_db:
    description: Database that holds the C(steep_repl) extension and the replicated tables (C(steep_pg_database)).
    type: str
    default: postgres
    aliases: [steep_pg_database, db, database]
  connect_timeout:
    description: Connection timeout in seconds.
    type: int
    default: 10
  ssl_mode:
    description: libpq C(sslmode) of the connection.
    type: str
    default: prefer
    choices: [allow, disable, prefer, require, verify-ca, verify-full]
  ca_cert:
    description: CA certificate file used to verify the server (libpq C(sslrootcert)).
    type: path
    aliases: [ssl_rootcert]
requirements:
  - psycopg2 (C(psycopg2-binary)) on the host that runs the task
notes:
  - The module connects over TCP with psycopg2, so it works delegated to the controller
    (C(delegate_to=localhost)); that is how Windows nodes are managed.
"""
