/* A stand-in for Windows' bcryptprimitives.dll, for Wine 8 only.
 *
 * Rust's standard library (1.78 and later) draws its random numbers from
 * ProcessPrng in bcryptprimitives.dll, which every Windows 10 and later
 * has, and which Wine added in 8.13 (stable from 9.0). Debian 12's Wine
 * is 8.0, so without this a Rust program does not even load there
 * ("bcryptprimitives.dll not found"). tests/windows/run.sh builds it with zig and puts it in the
 * throwaway Wine prefix's system32 when Wine has none of its own; it never
 * ships: the release binary uses Windows' own. ProcessPrng is documented to
 * always succeed; RtlGenRandom (advapi32's SystemFunction036, which Wine 8
 * has) fills the buffer from the same kind of source.
 */
#include <windows.h>
#define SystemFunction036 NTAPI SystemFunction036
#include <ntsecapi.h>
#undef SystemFunction036

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!RtlGenRandom(data, chunk)) {
            return FALSE;
        }
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
