/***
* approxrun test circuit (not part of EvoApproxLib): A * (B | 1), operands declared B first.
***/
// MAE% = 0.097 %
// MAE = 64 
// WCE% = 0.39 %
// WCE = 255 
// WCRE% = 100.00 %
// EP% = 49.80 %
// MRE% = 1.06 %
// MSE = 1085.875e1 
// PDK45_PWR = 0.300 mW
// PDK45_AREA = 500.0 um2
// PDK45_DELAY = 1.30 ns
#include <stdint.h>
#include <stdlib.h>

uint64_t mul8u_T03(const uint64_t B,const uint64_t A)
{
   uint64_t O;
   O = A * (B | 1);
   return O;
}
