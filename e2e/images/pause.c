/* Sandbox "pause" process for fleetboard's e2e tests: holds the pod's namespaces open.
 * Blocks in pause(); exits 0 on SIGTERM or SIGINT, reaps children on SIGCHLD (PID 1 duty). */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig) {
    (void)sig;
    _exit(0);
}

static void on_chld(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction term = {0};
    term.sa_handler = on_term;
    sigaction(SIGTERM, &term, NULL);
    sigaction(SIGINT, &term, NULL);

    struct sigaction chld = {0};
    chld.sa_handler = on_chld;
    chld.sa_flags = SA_NOCLDSTOP;
    sigaction(SIGCHLD, &chld, NULL);

    for (;;) {
        pause();
    }
    return 0;
}
