/***
* approxrun test circuit (not part of EvoApproxLib): the exact product minus (B & 3) when A is odd.
***/
// MAE% = 0.0011 %
// MAE = 0.75 
// WCE% = 0.0046 %
// WCE = 3 
// WCRE% = 300.00 %
// EP% = 37.50 %
// MRE% = 0.17 %
// MSE = 1.8 
// PDK45_PWR = 0.411 mW
// PDK45_AREA = 700.5 um2
// PDK45_DELAY = 1.45 ns
#include <stdint.h>
#include <stdlib.h>

int16_t mul8s_T01(int8_t A, int8_t B)
{
  int16_t P = A * B;
  if (A & 1)
    P -= B & 3;
  return P;
}
