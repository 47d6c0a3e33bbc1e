/*
 * The bundled ssh, scp and sftp: exec the real binary from the udiImage with our
 * client configuration, so every ssh started in the container speaks the job's
 * algorithms and trusts the job CA for the allocation's hosts.
 *
 * Written in C because it must run in images with no /bin/sh and no libc of their
 * own (it uses the bundle's loader and libc, like the OpenSSH binaries). One source,
 * compiled once per program with -DWRAP_SSH, -DWRAP_SCP or -DWRAP_SFTP: dispatching
 * on argv[0] would run the wrong program when a tool execs it under another name.
 *
 * ssh:  libexec/ssh -F UDI/etc/ssh_config ARGS   (the config Includes ~/.ssh/config)
 * scp:  libexec/scp -S UDI/bin/ssh ARGS           (scp's ssh is this ssh wrapper)
 * sftp: libexec/sftp -S UDI/bin/ssh ARGS
 * A -F or -S the user gives later on the command line still wins (last one counts).
 *
 * OPENSSL_CONF points at the bundle's empty openssl.cnf: the bundled libcrypto must
 * not read an image's OpenSSL configuration written for another OpenSSL version.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef UDI
#define UDI "/opt/udiImage"
#endif

#if defined(WRAP_SSH)
#define TARGET UDI "/libexec/ssh"
#define OPTION "-F"
#define VALUE UDI "/etc/ssh_config"
#elif defined(WRAP_SCP)
#define TARGET UDI "/libexec/scp"
#define OPTION "-S"
#define VALUE UDI "/bin/ssh"
#elif defined(WRAP_SFTP)
#define TARGET UDI "/libexec/sftp"
#define OPTION "-S"
#define VALUE UDI "/bin/ssh"
#else
#error "define one of WRAP_SSH, WRAP_SCP, WRAP_SFTP"
#endif

int main(int argc, char **argv)
{
    /* argv[0], our option and its value, the rest of argv, NULL: argc + 3 slots, and
     * one more when argc is 0 (execve with an empty argv), where argv[0] is ours. */
    int given = argc > 0 ? argc : 1;
    char **args = calloc((size_t)given + 3, sizeof(char *));
    if (args == NULL) {
        fputs("udiImage wrapper: out of memory\n", stderr);
        return 255;
    }
    args[0] = argc > 0 ? argv[0] : (char *)TARGET;
    args[1] = (char *)OPTION;
    args[2] = (char *)VALUE;
    for (int i = 1; i < argc; i++)
        args[i + 2] = argv[i];
    args[given + 2] = NULL;
    setenv("OPENSSL_CONF", UDI "/share/openssl.cnf", 1);
    execv(TARGET, args);
    fprintf(stderr, "udiImage wrapper: cannot run %s: %s\n", TARGET, strerror(errno));
    return 255;
}
