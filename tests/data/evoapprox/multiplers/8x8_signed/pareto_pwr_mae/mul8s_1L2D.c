/***
* approxrun test circuit standing in for the catalogue name mul8s_1L2D; it is NOT EvoApproxLib's
* mul8s_1L2D: the exact signed product with its four low bits dropped.
***/
// MAE% = 0.0099 %
// MAE = 6.5 
// WCE% = 0.023 %
// WCE = 15 
// EP% = 81.25 %
// MRE% = 1.29 %
// MSE = 65.25 
// PDK45_PWR = 0.100 mW
// PDK45_AREA = 300.0 um2
// PDK45_DELAY = 1.00 ns
#include <stdint.h>
#include <stdlib.h>

int16_t mul8s_1L2D(int8_t A, int8_t B)
{
  return (int16_t)((A * B) & ~15);
}
