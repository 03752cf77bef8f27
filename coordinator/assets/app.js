// Placeholder: the dashboard's pages replace this file.
"use strict";
