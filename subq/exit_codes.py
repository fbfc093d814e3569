"""One exit-code table for every ``subq`` command (documented once, in docs/cli.md).

A script can loop on 1 ("re-run the same command"), stop on 2 and 3 (a person must act), and
treat 0 and 4 as done.
"""

DONE = 0  # everything asked for is done
INCOMPLETE = 1  # stopped early (budget, outage, kill) or some rows failed: re-run the same command to resume
BAD_INPUT = 2  # a mistake in the command, config or inputs: nothing was started (or nothing was lost)
ACCOUNT_REFUSED = 3  # the endpoint refused the account (401/403, quota, billing): fix the account, then re-run
DONE_TRUNCATED = 4  # done, but some replies stay truncated at their token limit; a re-run will not pay for them
INTERRUPTED = 130  # Ctrl-C: finished work is stored; re-run to resume

TABLE = {
    DONE: "done",
    INCOMPLETE: "incomplete: stopped early or rows failed; re-run the same command to resume",
    BAD_INPUT: "bad input: nothing was started",
    ACCOUNT_REFUSED: "the endpoint refused the account (key, quota, billing)",
    DONE_TRUNCATED: "done, some replies truncated at their token limit (--retry-truncated asks again)",
    INTERRUPTED: "interrupted: finished work is stored; re-run to resume",
}
